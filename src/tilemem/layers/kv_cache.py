"""Preallocated KV cache: one row (slot) per sequence, written at absolute positions."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Keys [S, H, L, Dk] and values [S, H, L, Dv] per layer; S slots, L positions."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    index_keys: list[torch.Tensor | None] = field(default_factory=list)
    """DSA indexer keys [S, 1, L, Di] per layer (None where a layer has no indexer); empty without DSA."""

    @classmethod
    def allocate(
        cls,
        layers: int,
        slots: int,
        length: int,
        heads: int,
        k_dim: int,
        v_dim: int,
        dtype: torch.dtype,
        index_dim: int = 0,
        index_layers: Collection[int] = (),
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """Zeroed cache for `slots` sequences of up to `length` tokens (plus indexer keys of width
        `index_dim` for `index_layers`) on `device`."""
        kw = dict(dtype=dtype, device=device)
        return cls(
            keys=[torch.zeros(slots, heads, length, k_dim, **kw) for _ in range(layers)],
            values=[torch.zeros(slots, heads, length, v_dim, **kw) for _ in range(layers)],
            index_keys=[
                torch.zeros(slots, 1, length, index_dim, **kw) if i in index_layers else None for i in range(layers)
            ]
            if index_dim
            else [],
        )

    @property
    def slots(self) -> int:
        """Number of sequence rows."""
        return self.keys[0].shape[0]

    @property
    def device(self) -> torch.device:
        """Where the cache (and so every forward pass's context) lives."""
        return self.keys[0].device

    @property
    def length(self) -> int:
        """Positions per row."""
        return self.keys[0].shape[2]

    def nbytes(self) -> int:
        """Bytes held by the cache."""
        tensors = self.keys + self.values + [t for t in self.index_keys if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


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
    uniform_start: int | None = None
    """Where every row starts, when all start there and add T real tokens (new keys: one slice per row)."""
    causal: bool = False
    """No row has a cached prefix (so kv_len == T): for every real token, `mask` is plain causal masking
    (padding only ever follows a row's real tokens), so attention may use `is_causal` instead, which
    skips the key blocks past each query block rather than computing and masking them."""
    sparse_mask: torch.Tensor | None = None
    """[B, 1, T, kv_len] mask of the last DSA indexer run in this pass; layers sharing its top-k read it."""

    @classmethod
    def build(cls, cache: KVCache, slots: list[int], starts: list[int], lengths: list[int]) -> ForwardContext:
        """Context for rows whose cached prefix is `starts[b]` tokens and who add `lengths[b]` tokens
        (built on the CPU, then moved to the cache's device)."""
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
        dev = cache.device
        return cls(
            cache=cache,
            slots=torch.tensor(slots, device=dev),
            positions=positions.to(dev),
            valid=valid.to(dev),
            kv_len=kv_len,
            mask=mask.unsqueeze(1).to(dev),
            contiguous=slots == list(range(b)),
            uniform_start=starts[0] if len(set(starts)) == 1 and len(set(lengths)) == 1 else None,
            causal=max(starts) == 0,
        )

    @property
    def attn_mask(self) -> torch.Tensor | None:
        """`mask` for scaled_dot_product_attention, None where it may use is_causal=self.causal."""
        return None if self.causal else self.mask

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new k [B, H, T, Dk], v [B, H, T, Dv]; return cached k, v [B, H, kv_len, D*]."""
        return self._write_read(self.cache.keys[layer], k), self._write_read(self.cache.values[layer], v)

    def store_index(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """Write new DSA indexer keys k [B, T, Di]; return the cached ones [B, kv_len, Di]."""
        cached = self.cache.index_keys[layer] if layer < len(self.cache.index_keys) else None
        if cached is None:
            raise ValueError(
                f"the KV cache has no indexer keys for layer {layer}; allocate it with model.allocate_cache"
            )
        return self._write_read(cached, k.unsqueeze(1))[:, 0]

    def _write_read(self, c: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Write new [B, H, T, D] into cache rows c [S, H, L, D]; return c's rows [B, H, kv_len, D]."""
        b, _, t, _ = new.shape
        if t == 1 and self.contiguous:  # decode fast path: one position per row
            c[torch.arange(b, device=c.device), :, self.positions[:, 0]] = new[:, :, 0]
        elif self.uniform_start is not None and self.contiguous:  # e.g. a prefill of equal prompts
            c[:b, :, self.uniform_start : self.uniform_start + t] = new
        else:
            bi, ti = self.valid.nonzero(as_tuple=True)  # [N], [N]
            c[self.slots[bi], :, self.positions[bi, ti]] = new.permute(0, 2, 1, 3)[bi, ti]
        if self.contiguous:
            return c[:b, :, : self.kv_len]
        return c[self.slots, :, : self.kv_len]
