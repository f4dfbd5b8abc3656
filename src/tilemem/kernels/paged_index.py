"""The DSA lightning indexer's decode scores over a paged cache of indexer keys, read in place
(`csrc_portable/paged_index.c`, AVX2 + FMA).

index = paged_index_scores(q, weights, keys, tables, lengths, scale)   # [B, L], L = max(lengths)

index[b, l] = sum_h weights[b, h] * relu(scale * q[b, h] . k) for the key k at position l of row b (l <
lengths[b]), -inf past the row's length. Shape legend: B rows, Hi indexer heads, Di indexer width, N cache
blocks, bs positions per block, M blocks per row's table. Position p of row b lives in block tables[b, p // bs]
at offset p % bs. Where the portable library cannot run, `paged_index_scores_torch` (gather the blocks, then the
indexer's torch math in fp32) computes the same.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from tilemem.errors import KernelError
from tilemem.kernels import portable

_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_DTYPES = (torch.float32, torch.bfloat16)
_WHAT = "paged indexer scores"


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded portable library with `tmp_paged_index` typed, or None where it cannot run here."""
    out = portable.load()
    if out is None:
        return None
    args = [_vp, _vp, _i64, _i64, _vp, _int, *[_i64] * 4, _vp, _i64, _vp, _i64, _i64, ctypes.c_float, _vp, _int]
    out.tmp_paged_index.argtypes = args
    return out


def available() -> bool:
    """Whether the native paged indexer scores run here."""
    return lib() is not None


def paged_index_scores(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One indexer query per row against its row's cached indexer keys -> index [B, L] fp32, L = max(lengths).

    q [B, Hi, Di] fp32 or bf16; weights [B, Hi] fp32 (the per-head weights, already scaled); keys [N, 1, bs, Di]
    fp32 or bf16 (any strides but a unit one along the last dim); tables [B, M] int64; lengths [B] int64.
    index[b, l] = sum over h = 0..Hi-1 of weights[b, h] * relu(scale * (q[b, h] . key at position l of row b)),
    each dot in fp32, for l < lengths[b]; -inf for l >= lengths[b]. Raises KernelError for bad input (dtypes,
    shapes, a table entry outside the N blocks, a length past the table)."""
    q, weights, tables, lengths = _checked(q, weights, keys, tables, lengths)
    native = lib()
    if native is None or any(t.device.type != "cpu" for t in (q, weights, keys, tables, lengths)):
        return paged_index_scores_torch(q, weights, keys, tables, lengths, scale)
    b, hi, di = q.shape
    n, _, bs, _ = keys.shape
    length = int(lengths.max()) if b else 0
    out = torch.empty(b, length, dtype=torch.float32)
    status = native.tmp_paged_index(
        q.data_ptr(), weights.data_ptr(), hi, di, keys.data_ptr(), int(keys.dtype == torch.bfloat16), keys.stride(0),
        keys.stride(2), n, bs, tables.data_ptr(), tables.shape[1], lengths.data_ptr(), b, length, scale,
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status == 2:  # TMP_EINVAL: say which row and what
        _diagnose(tables, lengths, n, bs)
    if status != 0:
        raise KernelError(f"{_WHAT} of {b} rows failed (status {status}: out of memory for a thread's scratch?)")
    return out


def paged_index_scores_torch(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`paged_index_scores` in torch, row by row: gather the row's blocks, then the indexer's own ops (fp32 scores
    times scale, relu, the weights' matmul over heads). The fallback where the library cannot run, and the tests'
    reference."""
    q, weights, tables, lengths = _checked(q, weights, keys, tables, lengths)
    _diagnose(tables, lengths, keys.shape[0], keys.shape[2])
    b = q.shape[0]
    bs = keys.shape[2]
    length = int(lengths.max()) if b else 0
    out = torch.full((b, length), float("-inf"), dtype=torch.float32, device=q.device)
    for r in range(b):
        n = int(lengths[r])
        if n == 0:
            continue
        k = keys[tables[r, : (n + bs - 1) // bs], 0].flatten(0, 1)[:n].float()  # [n, Di]
        scores = F.relu(torch.matmul(q[r].float(), k.transpose(0, 1)) * scale)  # [Hi, n]
        out[r, :n] = torch.matmul(weights[r].unsqueeze(0), scores)[0]
    return out


def _checked(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The argument checks of `paged_index_scores` (KernelError naming the problem); returns q as contiguous
    fp32, weights, tables and lengths contiguous."""
    if q.dtype not in _DTYPES or keys.dtype not in _DTYPES or weights.dtype != torch.float32:
        raise KernelError(
            f"{_WHAT}: q and keys must be float32 or bfloat16 and weights float32, got q {q.dtype}, keys "
            f"{keys.dtype}, weights {weights.dtype}"
        )
    if q.dim() != 3 or keys.dim() != 4 or keys.shape[1] != 1 or weights.shape != q.shape[:2]:
        raise KernelError(
            f"{_WHAT}: needs q [B, Hi, Di], weights [B, Hi] and keys [N, 1, bs, Di], got q {list(q.shape)}, "
            f"weights {list(weights.shape)}, keys {list(keys.shape)}"
        )
    b, hi, di = q.shape
    if keys.shape[3] != di or hi == 0 or di == 0:
        raise KernelError(
            f"{_WHAT}: q has {hi} heads of width {di}; keys need that width (and at least one head of width >= 1), "
            f"got keys {list(keys.shape)}"
        )
    if keys.stride(3) != 1 and di > 1:
        raise KernelError(f"{_WHAT}: keys need unit stride along their last dim, got strides {keys.stride()}")
    for name, t, dims in (("tables", tables, 2), ("lengths", lengths, 1)):
        if t.dtype != torch.int64 or t.dim() != dims or t.shape[0] != b:
            raise KernelError(
                f"{_WHAT} of {b} rows: {name} must be int64 with {dims} dims and {b} rows, got {t.dtype} "
                f"{list(t.shape)}"
            )
    q = q.float().contiguous()
    return q, weights.contiguous(), tables.contiguous(), lengths.contiguous()


def _diagnose(tables: torch.Tensor, lengths: torch.Tensor, n: int, bs: int) -> None:
    """Raise KernelError for the first row whose length or used table entries do not fit."""
    m = tables.shape[1]
    for r, length in enumerate(lengths.tolist()):
        if not 0 <= length <= m * bs:
            raise KernelError(
                f"{_WHAT}: row {r} has length {length}, but its block table holds {m} blocks of {bs} positions "
                f"({m * bs}); the lengths must fit the block tables"
            )
        used = tables[r, : (length + bs - 1) // bs]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= n):
            raise KernelError(
                f"{_WHAT}: row {r}'s block table {used.tolist()} has an entry outside the cache's {n} blocks; the "
                "block tables do not belong to this cache"
            )
