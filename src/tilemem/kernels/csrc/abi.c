/* The interface version and the sizes of the structs Python mirrors with ctypes, checked at load. */
#include <string.h>

#include "tilemem.h"

int tm_abi_version(void) { return TM_ABI_VERSION; }

int64_t tm_struct_size(const char *name) {
  if (!strcmp(name, "tm_x12")) return (int64_t)sizeof(tm_x12);
  if (!strcmp(name, "tm_ffn_task")) return (int64_t)sizeof(tm_ffn_task);
  if (!strcmp(name, "tm_attn_layer")) return (int64_t)sizeof(tm_attn_layer);
  if (!strcmp(name, "tm_decode_layer")) return (int64_t)sizeof(tm_decode_layer);
  return -1;
}
