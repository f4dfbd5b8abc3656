"""Paged KV cache: per layer, pools of fixed-size blocks of token positions; each sequence has a block table.

Position p of a sequence whose block table is `table` lives in block `table[p // bs]` at offset `p % bs`.
The engine hands out blocks as sequences grow (`tilemem.engine.kv_blocks`); a "slot" cache
(`allocate(slots=S, length=L)`) is the special case where slot s owns blocks s*n .. s*n + n-1 (n = L / bs,
one block of L positions by default), so code that thinks in slots keeps working.

Layouts: keys [N, Hk, bs, Dk], values [N, Hk, bs, Dv] per layer (N blocks); DSA indexer keys [N, 1, bs, Di].
MLA layers cache the latent (Hk = 1, Dk = kv_lora_rank + rope dim, Dv = 0: the values are the latent's
first kv_lora_rank dims).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Block pools per layer: keys [N, Hk, bs, Dk], values [N, Hk, bs, Dv], optional indexer keys [N, 1, bs, Di]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    index_keys: list[torch.Tensor | None] = field(default_factory=list)
    """DSA indexer keys [N, 1, bs, Di] per layer (None where a layer has no indexer); empty without DSA."""
    slot_blocks: int = 1
    """Blocks per slot when the cache is addressed by slot (`allocate(slots=...)`, `ForwardContext.build`)."""

    @classmethod
    def allocate(
        cls,
        layers: int,
        slots: int,
        length: int,
        heads: int | Sequence[int],
        k_dim: int | Sequence[int],
        v_dim: int | Sequence[int],
        dtype: torch.dtype,
        index_dim: int = 0,
        index_layers: Collection[int] = (),
        device: torch.device | str = "cpu",
        block_size: int | None = None,
    ) -> KVCache:
        """Zeroed cache for `slots` sequences of up to `length` tokens (plus indexer keys of width `index_dim`
        for `index_layers`) on `device`: `slots` x ceil(length / block_size) blocks (block_size: length).
        heads/k_dim/v_dim: one value for every layer, or one per layer."""
        bs = block_size or length
        per = -(-length // bs)
        return cls.paged(layers, slots * per, bs, heads, k_dim, v_dim, dtype, index_dim, index_layers, device, per)

    @classmethod
    def paged(
        cls,
        layers: int,
        blocks: int,
        block_size: int,
        heads: int | Sequence[int],
        k_dim: int | Sequence[int],
        v_dim: int | Sequence[int],
        dtype: torch.dtype,
        index_dim: int = 0,
        index_layers: Collection[int] = (),
        device: torch.device | str = "cpu",
        slot_blocks: int = 1,
    ) -> KVCache:
        """Zeroed pools of `blocks` blocks of `block_size` positions per layer."""

        def per_layer(v: int | Sequence[int]) -> list[int]:
            return [v] * layers if isinstance(v, int) else list(v)

        hs, ks, vs = per_layer(heads), per_layer(k_dim), per_layer(v_dim)
        kw = dict(dtype=dtype, device=device)
        n, bs = blocks, block_size
        return cls(
            keys=[torch.zeros(n, hs[i], bs, ks[i], **kw) for i in range(layers)],
            values=[torch.zeros(n, hs[i], bs, vs[i], **kw) for i in range(layers)],
            index_keys=[torch.zeros(n, 1, bs, index_dim, **kw) if i in index_layers else None for i in range(layers)]
            if index_dim
            else [],
            slot_blocks=slot_blocks,
        )

    @property
    def blocks(self) -> int:
        """Blocks per layer pool."""
        return self.keys[0].shape[0]

    @property
    def block_size(self) -> int:
        """Token positions per block."""
        return self.keys[0].shape[2]

    @property
    def slots(self) -> int:
        """Sequences the cache holds when addressed by slot."""
        return self.blocks // self.slot_blocks

    @property
    def length(self) -> int:
        """Positions of one slot."""
        return self.slot_blocks * self.block_size

    @property
    def device(self) -> torch.device:
        """Where the cache (and so every forward pass's context) lives."""
        return self.keys[0].device

    def slot_table(self, slot: int) -> list[int]:
        """The block table of slot `slot`."""
        return list(range(slot * self.slot_blocks, (slot + 1) * self.slot_blocks))

    def _tensors(self) -> list[torch.Tensor]:
        return self.keys + self.values + [t for t in self.index_keys if t is not None]

    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def block_bytes(self) -> int:
        """Bytes of one block over every layer (what one more block of 16 tokens costs)."""
        return self.nbytes() // max(1, self.blocks)

    def grown(self, blocks: int) -> KVCache:
        """A cache of `blocks` blocks per pool holding this one's contents (block ids stay valid). A new object, so
        that whatever keeps pointers into the old pools (the native decode stacks) sees the change."""
        if blocks <= self.blocks:
            return self

        def bigger(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(blocks, *t.shape[1:], dtype=t.dtype, device=t.device)
            out[: t.shape[0]] = t
            return out

        return KVCache(
            [bigger(t) for t in self.keys],
            [bigger(t) for t in self.values],
            [None if t is None else bigger(t) for t in self.index_keys],
            self.slot_blocks,
        )

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block `src` into block `dst` in every layer (copy-on-write of a shared block)."""
        for t in self._tensors():
            t[dst] = t[src]


def _tables_tensor(tables: Sequence[Sequence[int]], blocks: int) -> torch.Tensor:
    """Block tables as [B, M] int64, short rows padded with block 0 (positions there are masked)."""
    m = max(1, max(len(t) for t in tables))
    out = torch.zeros(len(tables), m, dtype=torch.int64)
    for b, t in enumerate(tables):
        out[b, : len(t)] = torch.tensor(t, dtype=torch.int64)
    if tables and out.numel() and (int(out.max()) >= blocks or int(out.min()) < 0):
        raise ValueError(f"a block table names a block outside the cache's {blocks} blocks")
    return out


@dataclass
class ForwardContext:
    """Where a forward pass reads and writes: one batch of B rows of T (padded) new tokens."""

    cache: KVCache
    tables: torch.Tensor
    """[B, M] int64 block table of each row (on the cache's device; padded with block 0)."""
    rows: list[list[int]]
    """The block tables as lists (to build contexts for later positions of the same rows)."""
    positions: torch.Tensor
    """[B, T] absolute position of each new token (padding repeats the last valid one)."""
    valid: torch.Tensor
    """[B, T] which new tokens are real (not padding)."""
    kv_len: int
    """Positions to attend over: max over rows of (start + new tokens)."""
    lengths: torch.Tensor
    """[B] int64 positions each row attends after this pass (start + new tokens)."""
    mask: torch.Tensor
    """[B, 1, T, kv_len] True where a query may attend a key."""
    contiguous: bool
    """Row b's table is slot b's whole table of a slot cache of one block per slot, so reads are views."""
    uniform_start: int | None = None
    """Where every row starts, when all start there and add T real tokens."""
    causal: bool = False
    """No row has a cached prefix (so kv_len == T): for every real token, `mask` is plain causal masking
    (padding only ever follows a row's real tokens), so attention may use `is_causal` instead, which
    skips the key blocks past each query block rather than computing and masking them."""
    sparse_mask: torch.Tensor | None = None
    """[B, 1, T, kv_len] mask of the last DSA indexer run in this pass; layers sharing its top-k read it."""
    sparse_select: torch.Tensor | None = None
    """[B, T, K] positions the last DSA indexer kept for each query (-1: none); None while every key is kept."""

    @classmethod
    def build(cls, cache: KVCache, slots: list[int], starts: list[int], lengths: list[int]) -> ForwardContext:
        """Context for slot-addressed rows whose cached prefix is `starts[b]` tokens and who add `lengths[b]`."""
        kv_len = max(s + n for s, n in zip(starts, lengths, strict=True))
        if kv_len > cache.length:
            raise ValueError(f"sequence of {kv_len} tokens exceeds the KV cache length {cache.length}")
        return cls.paged(cache, [cache.slot_table(s) for s in slots], starts, lengths)

    @classmethod
    def paged(
        cls, cache: KVCache, tables: Sequence[Sequence[int]], starts: list[int], lengths: list[int]
    ) -> ForwardContext:
        """Context for rows with block tables `tables`, whose cached prefix is `starts[b]` tokens and who add
        `lengths[b]` tokens (built on the CPU, then moved to the cache's device)."""
        b, t = len(tables), max(lengths)
        offs = torch.arange(t)
        start = torch.tensor(starts).unsqueeze(1)  # [B, 1]
        n = torch.tensor(lengths).unsqueeze(1)  # [B, 1]
        valid = offs.unsqueeze(0) < n  # [B, T]
        positions = start + torch.minimum(offs.unsqueeze(0), n - 1)  # [B, T]
        ends = (start + n)[:, 0]  # [B]
        kv_len = int(ends.max())
        bs = cache.block_size
        for row, end in zip(tables, ends.tolist(), strict=True):
            if len(row) * bs < end:
                raise ValueError(f"a block table of {len(row)} blocks of {bs} cannot hold {end} positions")
        key_pos = torch.arange(kv_len)  # [L]
        mask = (key_pos.view(1, 1, kv_len) <= positions.unsqueeze(-1)) & (
            key_pos.view(1, 1, kv_len) < ends.view(-1, 1, 1)
        )  # [B, T, L]
        dev = cache.device
        rows = [list(r) for r in tables]
        return cls(
            cache=cache,
            tables=_tables_tensor(rows, cache.blocks).to(dev),
            rows=rows,
            positions=positions.to(dev),
            valid=valid.to(dev),
            kv_len=kv_len,
            lengths=ends.to(dev),
            mask=mask.unsqueeze(1).to(dev),
            contiguous=cache.slot_blocks == 1 and kv_len <= bs and rows == [[i] for i in range(b)],
            uniform_start=starts[0] if len(set(starts)) == 1 and len(set(lengths)) == 1 else None,
            causal=max(starts) == 0,
        )

    def at(self, starts: list[int], lengths: list[int]) -> ForwardContext:
        """A context for the same rows (same block tables) at other positions."""
        return ForwardContext.paged(self.cache, self.rows, starts, lengths)

    @property
    def attn_mask(self) -> torch.Tensor | None:
        """`mask` for scaled_dot_product_attention, None where it may use is_causal=self.causal."""
        return None if self.causal else self.mask

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new k [B, H, T, Dk], v [B, H, T, Dv]; return cached k, v [B, H, kv_len, D*]."""
        return self.write_read(self.cache.keys[layer], k), self.write_read(self.cache.values[layer], v)

    def store_index(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """Write new DSA indexer keys k [B, T, Di]; return the cached ones [B, kv_len, Di]."""
        cached = self.cache.index_keys[layer] if layer < len(self.cache.index_keys) else None
        if cached is None:
            raise ValueError(
                f"the KV cache has no indexer keys for layer {layer}; allocate it with model.allocate_cache"
            )
        return self.write_read(cached, k.unsqueeze(1))[:, 0]

    def write(self, c: torch.Tensor, new: torch.Tensor) -> None:
        """Write new [B, H, T, D] into the pool c [N, H, bs, D] at this pass's positions."""
        b, _, t, _ = new.shape
        bs = c.shape[2]
        if t == 1:  # decode: one position per row
            pos = self.positions[:, 0]  # [B]
            blk = self.tables[torch.arange(b, device=c.device), pos // bs]  # [B]
            c[blk, :, pos % bs] = new[:, :, 0]
        elif self.contiguous and self.uniform_start is not None:  # e.g. a prefill of equal prompts
            c[:b, :, self.uniform_start : self.uniform_start + t] = new
        else:
            bi, ti = self.valid.nonzero(as_tuple=True)  # [N], [N]
            pos = self.positions[bi, ti]  # [N]
            c[self.tables[bi, pos // bs], :, pos % bs] = new.permute(0, 2, 1, 3)[bi, ti]

    def read(self, c: torch.Tensor) -> torch.Tensor:
        """The pool c [N, H, bs, D]'s positions 0..kv_len-1 of every row -> [B, H, kv_len, D] (a view where the
        rows are a slot cache's first slots, else gathered block by block)."""
        b = self.tables.shape[0]
        bs = c.shape[2]
        if self.contiguous:
            return c[:b, :, : self.kv_len]
        nb = -(-self.kv_len // bs)
        g = c[self.tables[:, :nb]]  # [B, nb, H, bs, D]
        return g.transpose(1, 2).reshape(b, c.shape[1], nb * bs, c.shape[3])[:, :, : self.kv_len]

    def write_read(self, c: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Write new [B, H, T, D] into the pool c; return its rows [B, H, kv_len, D]."""
        self.write(c, new)
        return self.read(c)
