"""A decode step's attention block after its projections in one native call (`csrc_portable/paged_decode.c`,
AVX2 + FMA): q/k RMSNorm, clip, rope, the write of the new keys and values into the paged cache, and the paged
attention (`paged.paged_attention`) of B rows of one new token each.

o = decode_block(q, k, v, cos, sin, keys, values, tables, positions, scale, norm="head", q_weight=wq, ...)

Shape legend: B rows, H query heads, Hkv key/value heads (H a multiple), hd head width, N cache blocks, bs
positions per block, M blocks per row's table. Row b's new token sits at positions[b] (block
tables[b, positions[b] // bs], offset positions[b] % bs) and attends positions 0..positions[b].
"""

from __future__ import annotations

import ctypes
import functools

import torch

from tilemem.errors import KernelError
from tilemem.kernels import paged, portable

_vp, _i64, _int, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
DTYPES = (torch.float32, torch.bfloat16)
NORMS = {"none": 0, "full": 1, "head": 2}
"""q/k norm kind -> the kernel's code: none, over all heads at once (OLMoE), per head (Qwen3)."""


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded portable library with `tmp_paged_decode_block` typed, or None where it cannot run here."""
    out = paged.lib()
    if out is None:
        return None
    out.tmp_paged_decode_block.argtypes = [
        _vp, _i64, _vp, _i64, _vp, _i64, _int, *[_i64] * 4, _int, _vp, _vp, _f32, _int, _f32, _vp, _vp, _i64, _int,
        _vp, *[_i64] * 3, _vp, *[_i64] * 5, _vp, _i64, _vp, _f32, _vp, _int,
    ]  # fmt: skip
    return out


def available() -> bool:
    """Whether the native decode block runs here."""
    return lib() is not None


def decode_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    norm: str = "none",
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    clip: float | None = None,
) -> torch.Tensor:
    """The attention block of B decode rows after the projections -> o [B, H * hd] in q's dtype.

    q [B, H * hd], k and v [B, Hkv * hd]: one dtype, bf16 or fp32 (rows may be strided, elements contiguous);
    keys and values [N, Hkv, bs, hd] in that dtype (unit stride along hd): the new k and v are written there.
    cos, sin [B, hd]: `RotaryEmbedding.table`'s rows, fp32 to rotate in fp32, else q's dtype. norm: "none",
    "full" (q_weight [H * hd], k_weight [Hkv * hd]) or "head" (both [hd]), weights in q's dtype, eps its
    epsilon; clip: clamp q, k, v to [-clip, clip] after a full norm, before a head norm. tables [B, M] and
    positions [B] int64. Every op rounds as the torch modules do (`layers.attention.Attention`). Raises
    KernelError for bad input (dtypes, shapes, a position past its block table, a table entry outside the N
    blocks); nothing is written then."""
    native = portable.require(lib(), "decode_block", "paged", "use layers.attention.Attention's torch path")
    args = (q, k, v, cos, sin, keys, values, tables, positions, norm, q_weight, k_weight)
    b, h, hkv, hd, bs = _common(*args) or _checked(*args)
    tables, positions = tables.contiguous(), positions.contiguous()
    bf = q.dtype == torch.bfloat16
    if clip is not None:
        clip = _bound(clip, q.dtype)
    out = torch.empty(b, h * hd, dtype=q.dtype)
    status = native.tmp_paged_decode_block(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), int(bf), b, h, hkv, hd,
        NORMS[norm], None if q_weight is None else q_weight.data_ptr(),
        None if k_weight is None else k_weight.data_ptr(), eps, int(clip is not None), clip or 0.0, cos.data_ptr(),
        sin.data_ptr(), cos.stride(0), int(cos.dtype == torch.float32 and bf), keys.data_ptr(), *keys.stride()[:3],
        values.data_ptr(), *values.stride()[:3], keys.shape[0], bs, tables.data_ptr(), tables.shape[1],
        positions.data_ptr(), scale, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status == 2:  # TMP_EINVAL: say which row and what
        _diagnose(tables, positions, keys.shape[0], bs)
    portable.check_status(status, f"decode_block of {b} rows", "paged")
    return out


@functools.cache
def _bound(clip: float, dtype: torch.dtype) -> float:
    """The clip bound as torch clamps a tensor of `dtype`: rounded to the dtype."""
    return float(torch.tensor(clip, dtype=dtype))


def _common(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    norm: str,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
) -> tuple[int, int, int, int, int] | None:
    """B, H, Hkv, hd, bs where the arguments are a decode step's as `Attention` passes them (the checks of
    `_checked` in a few attribute reads, without naming a problem), else None."""
    try:
        b, nq = q.shape
        _, hkv, bs, hd = keys.shape
    except ValueError:
        return None
    dt, i64, nk = q.dtype, torch.int64, hkv * hd
    if norm == "none":
        weights = True
    else:
        wq, wk = (nq, nk) if norm == "full" else (hd, hd)
        weights = (
            (norm == "head" or norm == "full") and q_weight is not None and k_weight is not None
            and q_weight.dtype == dt and k_weight.dtype == dt and q_weight.shape == (wq,) and k_weight.shape == (wk,)
            and q_weight.is_contiguous() and k_weight.is_contiguous() and q_weight.is_cpu and k_weight.is_cpu
        )  # fmt: skip
    ok = (
        weights and (dt == torch.bfloat16 or dt == torch.float32) and k.dtype == dt and v.dtype == dt
        and keys.dtype == dt and values.dtype == dt and q.is_cpu and k.is_cpu and v.is_cpu and keys.is_cpu
        and values.is_cpu and cos.is_cpu and sin.is_cpu and tables.is_cpu and positions.is_cpu
        and values.shape == keys.shape and hd > 0 and hd % 2 == 0 and hkv > 0 and nq % (hkv * hd) == 0
        and k.shape == (b, nk) and v.shape == (b, nk) and q.stride(1) == 1 and k.stride(1) == 1
        and v.stride(1) == 1 and keys.stride(3) == 1 and values.stride(3) == 1 and cos.shape == (b, hd)
        and sin.shape == (b, hd) and (cos.dtype == dt or cos.dtype == torch.float32) and sin.dtype == cos.dtype
        and cos.stride(1) == 1 and sin.stride(1) == 1 and cos.stride(0) == sin.stride(0) and tables.dtype == i64
        and positions.dtype == i64 and tables.dim() == 2 and positions.dim() == 1 and tables.shape[0] == b
        and positions.shape[0] == b
    )  # fmt: skip
    return (b, nq // hd, hkv, hd, bs) if ok else None


def _checked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    norm: str,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
) -> tuple[int, int, int, int, int]:
    """The argument checks of `decode_block` (KernelError naming the problem); returns B, H, Hkv, hd, bs."""
    what = "decode_block"
    dt = q.dtype
    tensors = {"q": q, "k": k, "v": v, "keys": keys, "values": values}
    if dt not in DTYPES or any(t.dtype != dt for t in tensors.values()):
        got = ", ".join(f"{n} {t.dtype}" for n, t in tensors.items())
        raise KernelError(f"{what}: q, k, v, keys and values must share one dtype, float32 or bfloat16; got {got}")
    if any(t.device.type != "cpu" for t in (*tensors.values(), cos, sin, tables, positions)):
        raise KernelError(f"{what}: every tensor must be on the CPU")
    if keys.dim() != 4 or values.shape != keys.shape or q.dim() != 2 or k.dim() != 2 or v.dim() != 2:
        raise KernelError(
            f"{what}: needs q [B, H*hd], k and v [B, Hkv*hd], keys and values [N, Hkv, bs, hd]; got q "
            f"{list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, keys {list(keys.shape)}, values "
            f"{list(values.shape)}"
        )
    n, hkv, bs, hd = keys.shape
    b = q.shape[0]
    if hd == 0 or hd % 2 or q.shape[1] % hd or hkv == 0 or (q.shape[1] // hd) % hkv:
        raise KernelError(
            f"{what}: q's {q.shape[1]} columns must be H heads of the cache's even width {hd}, H a multiple of "
            f"its {hkv} kv heads"
        )
    h = q.shape[1] // hd
    if k.shape != (b, hkv * hd) or v.shape != (b, hkv * hd):
        raise KernelError(
            f"{what}: k and v must be [{b}, {hkv * hd}] ({hkv} kv heads of {hd}), got {list(k.shape)}, {list(v.shape)}"
        )
    if any(t.stride(-1) != 1 for t in (*tensors.values(), cos, sin)):
        raise KernelError(f"{what}: q, k, v, cos, sin, keys and values need unit stride along their last dim")
    rot = (torch.float32, dt)
    if cos.dtype not in rot or sin.dtype != cos.dtype or cos.shape != (b, hd) or sin.shape != (b, hd):
        raise KernelError(
            f"{what}: cos and sin must be [{b}, {hd}] of one dtype, float32 or q's {dt}; got cos {cos.dtype} "
            f"{list(cos.shape)}, sin {sin.dtype} {list(sin.shape)}"
        )
    if cos.stride(0) != sin.stride(0):
        raise KernelError(f"{what}: cos and sin need one row stride, got {cos.stride(0)} and {sin.stride(0)}")
    if norm not in NORMS:
        raise KernelError(f"{what}: norm must be one of {sorted(NORMS)}, got {norm!r}")
    if norm != "none":
        sizes = {"q_weight": h * hd, "k_weight": hkv * hd} if norm == "full" else {"q_weight": hd, "k_weight": hd}
        for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
            if w is None or w.dtype != dt or w.shape != (sizes[name],) or not w.is_contiguous() or w.is_cuda:
                got = "None" if w is None else f"{w.dtype} {list(w.shape)}"
                raise KernelError(
                    f"{what}: a {norm} norm needs {name} as a contiguous {dt} CPU vector of {sizes[name]}, got {got}"
                )
    for name, t, dims in (("tables", tables, 2), ("positions", positions, 1)):
        if t.dtype != torch.int64 or t.dim() != dims or t.shape[0] != b:
            raise KernelError(
                f"{what} of {b} rows: {name} must be int64 with {dims} dims and {b} rows, got {t.dtype} {list(t.shape)}"
            )
    return b, h, hkv, hd, bs


def _diagnose(tables: torch.Tensor, positions: torch.Tensor, n: int, bs: int) -> None:
    """Raise KernelError for the first row whose position or used table entries do not fit."""
    m = tables.shape[1]
    for r, pos in enumerate(positions.tolist()):
        if not 0 <= pos < m * bs:
            raise KernelError(
                f"decode_block: row {r} is at position {pos}, but its block table holds {m} blocks of {bs} "
                f"positions ({m * bs})"
            )
        used = tables[r, : pos // bs + 1]
        if int(used.min()) < 0 or int(used.max()) >= n:
            raise KernelError(
                f"decode_block: row {r}'s block table {used.tolist()} has an entry outside the cache's {n} blocks; "
                "the block tables do not belong to this cache"
            )
