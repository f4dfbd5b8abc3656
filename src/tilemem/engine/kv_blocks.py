"""KV-cache blocks: who holds which, and prefix caching.

The pool hands out block ids of the paged KV cache (`layers.kv_cache`) to sequences as they grow, and takes
them back when they end. With prefix caching on, every *full* block is also known by a hash of its tokens and
of every token before them (a chain: block i's hash covers tokens 0 .. (i+1)*bs - 1), so a later request whose
prompt starts with the same tokens reuses those blocks instead of computing them again. Blocks are
reference-counted (several running sequences may share a prefix); a block no sequence holds stays cached,
evictable, and is reused least-recently-released first when no free block is left.

A block's contents depend only on its tokens and the tokens before them (causal attention), so a hit gives
the same keys and values a cold prefill computes (up to the rounding of a different batch shape).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

ROOT = b"tilemem-kv-prefix"
"""The chain's seed: the hash 'before' block 0."""


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a full block of `tokens` following the block hashed `parent` (ROOT for block 0)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass
class PrefixStats:
    """Prefix-caching counters since the pool was made."""

    queried_tokens: int = 0
    """Prompt tokens looked up (every admitted sequence's tokens to compute)."""
    hit_tokens: int = 0
    """Of those, tokens found cached (not computed again)."""
    evictions: int = 0
    """Cached blocks reused for other tokens."""

    @property
    def hit_rate(self) -> float:
        """hit_tokens / queried_tokens (0 when nothing was queried)."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockPool:
    """Block ids 0..blocks-1 of a paged KV cache of `block_size` positions per block."""

    def __init__(self, blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = 0
        self.free: deque[int] = deque()
        """Blocks holding nothing anyone may reuse."""
        self.refs: list[int] = []
        self.hash_of: dict[int, bytes] = {}
        """Full block -> its chain hash (cached blocks, held or not)."""
        self.by_hash: dict[bytes, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()
        """Cached blocks nobody holds, least recently released first."""
        self.stats = PrefixStats()
        self.grow(blocks)

    def grow(self, blocks: int) -> None:
        """Add blocks up to `blocks` in all (the cache's pools grow with them)."""
        for b in range(self.blocks, blocks):
            self.free.append(b)
            self.refs.append(0)
        self.blocks = max(self.blocks, blocks)

    @property
    def available(self) -> int:
        """Blocks a sequence can get now (free ones and cached ones nobody holds)."""
        return len(self.free) + len(self.evictable)

    @property
    def used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.blocks - self.available

    @property
    def cached(self) -> int:
        """Blocks known by hash (held or evictable)."""
        return len(self.hash_of)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` positions."""
        return -(-tokens // self.block_size)

    def match(self, tokens: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """The cached blocks that start `tokens`, and their hashes: at most (len(tokens) - 1) // bs blocks, so
        at least one token is left to compute (its logits are what the request wants)."""
        if not self.prefix_caching:
            return [], []
        bs = self.block_size
        found, hashes, parent = [], [], ROOT
        for i in range((len(tokens) - 1) // bs):
            h = block_hash(parent, tokens[i * bs : (i + 1) * bs])
            block = self.by_hash.get(h)
            if block is None:
                break
            found.append(block)
            hashes.append(h)
            parent = h
        return found, hashes

    def hold(self, blocks: Sequence[int]) -> None:
        """Take a reference to cached `blocks` (a prefix hit)."""
        for b in blocks:
            if self.refs[b] == 0:
                self.evictable.pop(b, None)
            self.refs[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks for one sequence (free ones first, then the least recently released cached ones), or None
        when fewer than `n` are available (nothing taken)."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.popleft()
            else:
                b, _ = self.evictable.popitem(last=False)
                del self.by_hash[self.hash_of.pop(b)]
                self.stats.evictions += 1
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each of `blocks` (a sequence ended or was preempted), last block first, so
        that under pressure a prefix's tail is evicted before its head."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] < 0:
                raise RuntimeError(f"KV block {b} released more often than taken")
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self.evictable[b] = None
                    self.evictable.move_to_end(b)
                else:
                    self.free.append(b)

    def register(self, block: int, h: bytes) -> None:
        """Make the full block `block` findable by its chain hash `h` (a block with the same hash already
        cached wins: this one stays private to its sequence and is freed when it ends)."""
        if not self.prefix_caching or h in self.by_hash or block in self.hash_of:
            return
        self.by_hash[h] = block
        self.hash_of[block] = h


DEFAULT_BLOCK_SIZE = 16
"""Token positions per KV block (vLLM's default)."""

DEFAULT_MEMORY_SHARE = 0.5
"""Without --kv-memory, the cache may grow to at most this share of the memory available when the engine starts
(and to no more than max_batch full-length sequences)."""


@dataclass(frozen=True)
class KVSettings:
    """How the engine's paged KV cache is sized and shared."""

    memory: int | None = None
    """Most bytes the cache may hold (--kv-memory); None: `DEFAULT_MEMORY_SHARE` of the available memory, at most
    max_batch sequences of max_model_len tokens."""
    block_size: int = DEFAULT_BLOCK_SIZE
    prefix_caching: bool = True
    memory_limit: str | int | None = None
    """The process's memory cap (--memory-limit) the default is measured under; None: measured."""

    def limit_blocks(self, block_bytes: int, max_batch: int, max_model_len: int) -> int:
        """The most blocks the cache may grow to."""
        if self.memory is not None:
            return max(1, self.memory // block_bytes)
        from tilemem.memlimit import memory_limit

        full = max_batch * -(-max_model_len // self.block_size)
        room = int(memory_limit(self.memory_limit).available * DEFAULT_MEMORY_SHARE) // block_bytes
        return max(min(full, room), -(-max_model_len // self.block_size))
