/* AMX tiles (Intel Sapphire Rapids and later) for the prefill GEMM, and the process-wide switch for them. */
#include <sys/syscall.h>
#include <unistd.h>

#include "internal.h"

/* AMX (Intel Sapphire Rapids and later): the same GEMM on tile registers, 16 x 16 fp32 outputs per
 * tdpbf16ps. An A tile is 16 weight rows x 32 bf16 of k, loaded in place (stride: the row length); a
 * B tile is 16 pairs of k x 16 tokens of a packed group (stride GB words: pack_pairs' layout is the
 * tile layout); C tiles are stored straight into o's rows. A thread configures its tiles on entry to
 * a call that runs GEMMs and releases them on the way out (oneDNN, on the same threads, releases its
 * own after each call), and only a configured thread takes this path (tiles 0-1 weights, 2-4 tokens,
 * 4-7 or 5-7 outputs). */
#define AMX_PF 2 /* steps ahead that a block prefetches its rows (2-4% faster than none) */
int use_amx; /* set by tm_amx_enable */
__thread int amx_ready;

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")
typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} amx_cfg;

/* Tiles 0-7: 16 rows of 64 bytes. A constant in memory: gcc drops stores to a local that only the
 * ldtilecfg reads. */
static const amx_cfg AMX_CFG __attribute__((aligned(64))) = {
    1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

void amx_configure(void) {
  _tile_loadconfig(&AMX_CFG);
  amx_ready = 1;
}

void amx_release(void) {
  _tile_release();
  amx_ready = 0;
}

/* Rows [0, R) of gemm_rows (R a multiple of 16, K of 32) for nb 16-token vectors of a packed group:
 * two row blocks per pass over k for up to 32 tokens, one row block for 48. */
void gemm_rows_amx(const uint16_t *w, int64_t ld, int R, const uint32_t *p, int nb, int64_t K, float *o) {
  const int64_t sw = ld * 2, sp = GB * 4;
  int r = 0;
  if (nb <= 2)
    for (; r + 32 <= R; r += 32) {
      const uint16_t *w0 = w + r * ld, *w1 = w0 + 16 * ld;
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      for (int64_t k = 0; k < K; k += 32) {
        if (k + AMX_PF * 32 < K)
          for (int j = 0; j < 32; j++) _mm_prefetch((const char *)(w0 + j * ld + k + AMX_PF * 32), _MM_HINT_T0);
        _tile_loadd(0, w0 + k, sw);
        _tile_loadd(1, w1 + k, sw);
        _tile_loadd(2, p + (k / 2) * GB, sp);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(6, 1, 2);
        if (nb == 2) {
          _tile_loadd(3, p + (k / 2) * GB + 16, sp);
          _tile_dpbf16ps(5, 0, 3);
          _tile_dpbf16ps(7, 1, 3);
        }
      }
      _tile_stored(4, o + r * GB, sp);
      _tile_stored(6, o + (r + 16) * GB, sp);
      if (nb == 2) {
        _tile_stored(5, o + r * GB + 16, sp);
        _tile_stored(7, o + (r + 16) * GB + 16, sp);
      }
    }
  for (; r < R; r += 16) {
    const uint16_t *w0 = w + r * ld;
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t k = 0; k < K; k += 32) {
      const uint32_t *pk = p + (k / 2) * GB;
      _tile_loadd(0, w0 + k, sw);
      _tile_loadd(2, pk, sp);
      _tile_dpbf16ps(5, 0, 2);
      if (nb > 1) {
        _tile_loadd(3, pk + 16, sp);
        _tile_dpbf16ps(6, 0, 3);
      }
      if (nb > 2) {
        _tile_loadd(4, pk + 32, sp);
        _tile_dpbf16ps(7, 0, 4);
      }
    }
    _tile_stored(5, o + r * GB, sp);
    if (nb > 1) _tile_stored(6, o + r * GB + 16, sp);
    if (nb > 2) _tile_stored(7, o + r * GB + 32, sp);
  }
}
#pragma GCC pop_options

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Asks Linux for the AMX tile state (granted per process) and, granted, routes the GEMMs of whole
 * 16-row blocks through AMX. Returns whether AMX is on. */
int tm_amx_enable(int on) {
  use_amx = on && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return use_amx;
}

int tm_amx_enabled(void) { return use_amx; }
