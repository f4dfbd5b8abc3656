"""Decode attention over a paged KV cache, read in place (`csrc_portable/paged_attention.c`, AVX2 + FMA).

out = paged_attention(q, keys, values, tables, lengths, scale)          # row b: positions 0..lengths[b]-1
out = paged_attention(q, keys, values, tables, lengths, scale, select)  # row b: positions select[b] (>= 0)

Shape legend: B rows, H query heads, Hkv key/value heads (H a multiple: head h reads kv head h // (H // Hkv)),
Dk key width, Dv value width, N cache blocks, bs positions per block, M blocks per row's table, K selected
positions per row. Position p of row b lives in block tables[b, p // bs] at offset p % bs. Where the portable
library cannot run, `paged_attention_torch` (gather the blocks, then the math in fp32) computes the same.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from tilemem.errors import KernelError
from tilemem.kernels import portable

_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded portable library with `tmp_paged_attention` typed, or None where it cannot run here."""
    out = portable.load()
    if out is None:
        return None
    args = [_vp, _int, _i64, _i64, _vp, _vp, _int, *[_i64] * 8, _vp, _i64, _vp, _vp, *[_i64] * 6, ctypes.c_float]
    out.tmp_paged_attention.argtypes = [*args, _vp, _int]
    return out


def available() -> bool:
    """Whether the native paged attention runs here."""
    return lib() is not None


def paged_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    select: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per row and head against the positions of a paged KV cache -> [B, H, Dv] in q's dtype.

    q [B, H, Dk] fp32 or bf16; keys [N, Hkv, bs, Dk] and values [N, Hkv, bs, Dv] of one dtype (fp32 or bf16; any
    strides but a unit one along the last dim, so values may be a view of keys, e.g. MLA's `keys[..., :R]`);
    tables [B, M] int64; lengths [B] int64: row b attends positions 0..lengths[b]-1, or with `select` [B, K]
    int64 only the positions select[b] that are >= 0 (each below lengths[b]). Scores and softmax in fp32, the
    probabilities rounded to the values' dtype for the weighted sum (fp32), as torch's CPU SDPA does for bf16. A
    row with no position gets zeros. Raises KernelError for bad input (dtypes, shapes, a table entry outside the
    N blocks, a length past the table, a selected position past its row's length)."""
    tables, lengths, select = _checked(q, keys, values, tables, lengths, select)
    native = lib()
    if native is None or q.device.type != "cpu":
        return paged_attention_torch(q, keys, values, tables, lengths, scale, select)
    b, h, dk = q.shape
    n, hkv, bs, dv = *keys.shape[:3], values.shape[3]
    out = torch.empty(b, h, dv, dtype=q.dtype)
    k = 0 if select is None else select.shape[1]
    status = native.tmp_paged_attention(
        q.data_ptr(), int(q.dtype == torch.bfloat16), q.stride(0), q.stride(1), keys.data_ptr(), values.data_ptr(),
        int(keys.dtype == torch.bfloat16), *keys.stride()[:3], *values.stride()[:3], n, bs, tables.data_ptr(),
        tables.shape[1], lengths.data_ptr(), None if select is None else select.data_ptr(), k, b, h, hkv, dk, dv,
        scale, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status == 2:  # TMP_EINVAL: say which row and what
        _diagnose(tables, lengths, select, n, bs)
    if status != 0:
        raise KernelError(f"paged attention of {b} rows failed (status {status}: out of memory for its scores?)")
    return out


def paged_attention_torch(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    select: torch.Tensor | None = None,
) -> torch.Tensor:
    """`paged_attention` in torch, row by row: gather the row's blocks, then scores, softmax and the weighted sum
    in fp32 (no bf16 rounding inside). The fallback where the library cannot run, and the tests' reference."""
    tables, lengths, select = _checked(q, keys, values, tables, lengths, select)
    _diagnose(tables, lengths, select, keys.shape[0], keys.shape[2])
    b, h, _ = q.shape
    hkv, bs = keys.shape[1], keys.shape[2]
    out = torch.zeros(b, h, values.shape[3], dtype=torch.float32, device=q.device)
    for r in range(b):
        n = int(lengths[r])
        pos = torch.arange(n, device=q.device) if select is None else select[r][select[r] >= 0]  # [P]
        if pos.numel() == 0:
            continue
        blocks = tables[r, : (n + bs - 1) // bs]  # [nb]
        k = keys[blocks].transpose(0, 1).flatten(1, 2)[:, pos].float()  # [Hkv, P, Dk]
        v = values[blocks].transpose(0, 1).flatten(1, 2)[:, pos].float()  # [Hkv, P, Dv]
        k, v = (t.repeat_interleave(h // hkv, dim=0) for t in (k, v))  # [H, P, D]
        s = torch.einsum("hd,hpd->hp", q[r].float(), k) * scale  # [H, P]
        out[r] = torch.einsum("hp,hpd->hd", torch.softmax(s, dim=-1), v)
    return out.to(q.dtype)


def _checked(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    select: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The argument checks of `paged_attention` (KernelError naming the problem); returns tables, lengths and
    select contiguous."""
    what = "paged attention"
    if q.dtype not in _DTYPES or keys.dtype not in _DTYPES or values.dtype != keys.dtype:
        raise KernelError(
            f"{what}: q must be float32 or bfloat16 and keys/values one of them too, got q {q.dtype}, keys "
            f"{keys.dtype}, values {values.dtype}"
        )
    if q.dim() != 3 or keys.dim() != 4 or values.dim() != 4 or keys.shape[:3] != values.shape[:3]:
        raise KernelError(
            f"{what}: needs q [B, H, Dk], keys [N, Hkv, bs, Dk] and values [N, Hkv, bs, Dv], got q "
            f"{list(q.shape)}, keys {list(keys.shape)}, values {list(values.shape)}"
        )
    b, h, dk = q.shape
    hkv = keys.shape[1]
    if keys.shape[3] != dk or hkv == 0 or h % hkv:
        raise KernelError(
            f"{what}: q has {h} heads of width {dk}; keys need that width and a head count dividing {h}, got "
            f"{list(keys.shape)}"
        )
    if q.stride(2) != 1 or keys.stride(3) != 1 or values.stride(3) != 1:
        raise KernelError(f"{what}: q, keys and values need unit stride along their last dim")
    for name, t, dims in (("tables", tables, 2), ("lengths", lengths, 1), ("select", select, 2)):
        if t is not None and (t.dtype != torch.int64 or t.dim() != dims or t.shape[0] != b):
            raise KernelError(
                f"{what} of {b} rows: {name} must be int64 with {dims} dims and {b} rows, got {t.dtype} {list(t.shape)}"
            )
    if tables.numel() and int(tables.max()) >= keys.shape[0]:
        raise KernelError(
            f"{what}: block table entry {int(tables.max())} is out of range of the cache's {keys.shape[0]} blocks; "
            "the block tables do not belong to this cache"
        )
    return tables.contiguous(), lengths.contiguous(), None if select is None else select.contiguous()


def _diagnose(tables: torch.Tensor, lengths: torch.Tensor, select: torch.Tensor | None, n: int, bs: int) -> None:
    """Raise KernelError for the first row whose length, selected positions or used table entries do not fit."""
    m = tables.shape[1]
    for r, length in enumerate(lengths.tolist()):
        if not 0 <= length <= m * bs:
            raise KernelError(
                f"paged attention: row {r} has length {length}, but its block table holds {m} blocks of {bs} "
                f"positions ({m * bs})"
            )
        used = tables[r, : (length + bs - 1) // bs]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= n):
            raise KernelError(
                f"paged attention: row {r}'s block table {used.tolist()} has an entry outside the cache's {n} blocks"
            )
        if select is not None and select.shape[1] and int(select[r].max()) >= length:
            raise KernelError(
                f"paged attention: row {r} selects position {int(select[r].max())}, past its length {length}"
            )
