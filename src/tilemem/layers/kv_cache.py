"""Preallocated KV cache: one row (slot) per sequence, written at absolute positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Keys [S, H, L, Dk] and values [S, H, L, Dv] per layer; S slots, L positions."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(
        cls, layers: int, slots: int, length: int, heads: int, k_dim: int, v_dim: int, dtype: torch.dtype
    ) -> KVCache:
        """Zeroed cache for `slots` sequences of up to `length` tokens."""
        return cls(
            keys=[torch.zeros(slots, heads, length, k_dim, dtype=dtype) for _ in range(layers)],
            values=[torch.zeros(slots, heads, length, v_dim, dtype=dtype) for _ in range(layers)],
        )

    @property
    def slots(self) -> int:
        """Number of sequence rows."""
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        """Positions per row."""
        return self.keys[0].shape[2]

    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass
class ForwardContext:
    """Where a forward pass reads and writes: one batch of B rows of T (padded) new tokens."""

    cache: KVCache
    slots: torch.Tensor
    """[B] cache row of each sequence."""
    positions: torch.Tensor
    """[B, T] absolute position of each new token (padding repeats the last valid one)."""
    valid: torch.Tensor
    """[B, T] which new tokens are real (not padding)."""
    kv_len: int
    """Positions to attend over: max over rows of (start + new tokens)."""
    mask: torch.Tensor
    """[B, 1, T, kv_len] True where a query may attend a key."""
    contiguous: bool
    """Slots are 0..B-1, so cache rows can be sliced instead of gathered."""

    @classmethod
    def build(cls, cache: KVCache, slots: list[int], starts: list[int], lengths: list[int]) -> ForwardContext:
        """Context for rows whose cached prefix is `starts[b]` tokens and who add `lengths[b]` tokens."""
        b, t = len(slots), max(lengths)
        offs = torch.arange(t)
        start = torch.tensor(starts).unsqueeze(1)  # [B, 1]
        n = torch.tensor(lengths).unsqueeze(1)  # [B, 1]
        valid = offs.unsqueeze(0) < n  # [B, T]
        positions = start + torch.minimum(offs.unsqueeze(0), n - 1)  # [B, T]
        kv_len = int((start + n).max())
        if kv_len > cache.length:
            raise ValueError(f"sequence of {kv_len} tokens exceeds the KV cache length {cache.length}")
        key_pos = torch.arange(kv_len)  # [L]
        mask = (key_pos.view(1, 1, kv_len) <= positions.unsqueeze(-1)) & (
            key_pos.view(1, 1, kv_len) < (start + n).unsqueeze(-1)
        )  # [B, T, L]
        return cls(
            cache=cache,
            slots=torch.tensor(slots),
            positions=positions,
            valid=valid,
            kv_len=kv_len,
            mask=mask.unsqueeze(1),
            contiguous=slots == list(range(b)),
        )

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new k [B, H, T, Dk], v [B, H, T, Dv]; return cached k, v [B, H, kv_len, D*]."""
        kc, vc = self.cache.keys[layer], self.cache.values[layer]
        b, _, t, _ = k.shape
        if t == 1 and self.contiguous:  # decode fast path: one position per row
            rows = torch.arange(b)
            kc[rows, :, self.positions[:, 0]] = k[:, :, 0]
            vc[rows, :, self.positions[:, 0]] = v[:, :, 0]
        else:
            bi, ti = self.valid.nonzero(as_tuple=True)  # [N], [N]
            kc[self.slots[bi], :, self.positions[bi, ti]] = k.permute(0, 2, 1, 3)[bi, ti]
            vc[self.slots[bi], :, self.positions[bi, ti]] = v.permute(0, 2, 1, 3)[bi, ti]
        if self.contiguous:
            return kc[:b, :, : self.kv_len], vc[:b, :, : self.kv_len]
        return kc[self.slots, :, : self.kv_len], vc[self.slots, :, : self.kv_len]
