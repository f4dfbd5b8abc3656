"""Expert FFNs on a GPU with few kernel launches and no host synchronisation.

A GPU finishes one small expert GEMV in microseconds, so a per-expert loop is bound by launches and
by the host reading routing results back. Two shapes cover the MoE work:
- `gathered_ffn` (decode, few tokens): every (token, expert-or-tile) pair at once. The weights of the
  pairs are gathered from a stacked tensor by index on the GPU, then two batched GEMMs; the gather
  copies each weight once, which costs less than the launches it saves at a few tokens.
- `stacked_ffn` (prefill, many tokens of one expert): all tiles of one expert in two batched GEMMs.

A layer's VRAM tiles live in a slab: `TileSlab` holds them in the compute dtype, `Fp8Slab` and `GgmlSlab` as the
checkpoint stores them (FP8: one byte per weight plus block scales; GGUF: the file's quant blocks). A quantized
slab's `dense` dequantizes the tiles a GEMM needs (those of its pairs, or of one expert) with torch on the GPU,
right before it, to the compute dtype: VRAM holds the quantized bytes, and only the tiles one GEMM needs exist in
the compute dtype, while it runs. (In bf16 a dequantized weight, e4m3 value times fp32 scale, is rounded to bf16
once; in fp32 it is the reference's value exactly.)

Shape legend: T tokens, P pairs, S stacked units (experts or tiles), n neurons per unit, D hidden.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tilemem.layers import fp8, ggml

GATHER_MAX_PAIRS = 64
"""Above this many (token, expert) pairs a layer groups tokens by expert instead of gathering."""


def gathered_ffn(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down_t: torch.Tensor,
    tok: torch.Tensor,
    unit: torch.Tensor,
    scale: torch.Tensor,
    act,
    out: torch.Tensor,
) -> None:
    """out[tok[p]] += scale[p] * FFN of unit[p] on x[tok[p]], for all pairs p at once (fp32 out).

    x [T, D]; gate_up [S, 2n, D] (gate rows, then up rows); down_t [S, n, D] (down transposed);
    tok, unit [P] (int64 on x's device); scale [P]; out [T, D] fp32."""
    n = gate_up.shape[1] // 2
    xs = x[tok].unsqueeze(-1)  # [P, D, 1]
    gu = torch.bmm(gate_up[unit], xs)  # [P, 2n, 1]
    h = act(gu[:, :n]) * gu[:, n:]  # [P, n, 1]
    y = torch.bmm(h.transpose(1, 2), down_t[unit]).squeeze(1)  # [P, D]
    out.index_add_(0, tok, (y * scale[:, None]).float())


def padded_ffn(
    x: torch.Tensor, gate_up: torch.Tensor, down_t: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, act
) -> torch.Tensor:
    """Every routed expert at once for many tokens: tokens sorted by expert into a zero-padded
    [E, N_max, D] batch, two batched GEMMs over all experts, scattered back in fp32. One host sync
    (N_max); padding rows cost FLOPs, which a GPU has to spare, instead of a launch per expert.

    x [T, D], gate_up [E, 2I, D], down_t [E, I, D], weights / ids [T, K] -> [T, D] fp32."""
    t, k = ids.shape
    e, two_i, _ = gate_up.shape
    flat = ids.reshape(-1)  # [P]
    order = torch.argsort(flat, stable=True)  # pairs sorted by expert
    expert = flat[order]
    counts = torch.bincount(flat, minlength=e)  # [E]
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(t * k, device=x.device) - starts[expert]  # row of each sorted pair in its expert
    tok = order // k
    buf = x.new_zeros(e, int(counts.max()), x.shape[1])  # [E, N_max, D]
    buf[expert, pos] = x[tok]
    gu = torch.bmm(buf, gate_up.transpose(1, 2))  # [E, N_max, 2I]
    h = act(gu[..., : two_i // 2]) * gu[..., two_i // 2 :]
    y = torch.bmm(h, down_t)[expert, pos]  # [P, D]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, (y * weights.reshape(-1)[order][:, None]).float())
    return out


def stacked_ffn(xs: torch.Tensor, gate_up: torch.Tensor, down_t: torch.Tensor, act) -> torch.Tensor:
    """Sum over k units of FFN_k(xs), in fp32: xs [N, D], gate_up [k, 2n, D], down_t [k, n, D] -> [N, D]."""
    n = gate_up.shape[1] // 2
    gu = torch.matmul(xs, gate_up.transpose(1, 2))  # [k, N, 2n]
    h = act(gu[..., :n]) * gu[..., n:]  # [k, N, n]
    return torch.matmul(h, down_t).float().sum(0)  # [N, D]


def _take(t: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
    """t[slots] along dim 0: a view where the slots are consecutive, else a gather by an index on t's device."""
    slots = list(slots)
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return t[slots[0] : slots[0] + len(slots)]
    return t[torch.tensor(slots).to(t.device, non_blocking=True)]


class TileSlab:
    """One layer's VRAM-resident tiles, stacked so any subset runs as one gathered GEMM: gate_up
    [S, 2n, D] and down^T [S, n, D], n the store's tile size (a shorter last tile of an expert is
    zero-padded: zero gate and up rows add act(0) * 0 = 0). Each expert's tiles take consecutive slots."""

    packed = False
    """Whether `dense` must dequantize (a quantized slab) rather than index `gate_up` / `down_t`."""

    def __init__(self, blocks: dict[int, list[torch.Tensor]], tile: int, device: torch.device) -> None:
        """blocks: expert -> its VRAM tiles as [3, n_i, D] blocks (n_i <= tile), in neuron order."""
        count = sum(len(b) for b in blocks.values())
        first = next(b[0] for b in blocks.values() if b)
        d, dtype = first.shape[-1], first.dtype
        self.gate_up = torch.zeros(count, 2 * tile, d, dtype=dtype, device=device)
        self.down_t = torch.zeros(count, tile, d, dtype=dtype, device=device)
        self.slots: dict[int, tuple[int, int]] = {}  # expert -> (first slot, count)
        s = 0
        for expert, tiles in sorted(blocks.items()):
            self.slots[expert] = (s, len(tiles))
            for b in tiles:
                n = b.shape[1]
                self.gate_up[s, :n] = b[0].to(device)
                self.gate_up[s, tile : tile + n] = b[1].to(device)
                self.down_t[s, :n] = b[2].to(device)
                s += 1

    @property
    def nbytes(self) -> int:
        """VRAM the slab takes."""
        return sum(t.numel() * t.element_size() for t in (self.gate_up, self.down_t))

    def unit_bytes(self, unit: int) -> int:
        """VRAM bytes of one unit's (expert's) tiles."""
        return self.slots[unit][1] * self.nbytes // self.gate_up.shape[0]

    def dense(self, slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [k, 2n, D] and down^T [k, n, D] of `slots` (ascending), in the compute dtype."""
        return _take(self.gate_up, slots), _take(self.down_t, slots)


class Fp8Slab:
    """One layer's VRAM-resident FP8 tiles as stored: `data` their e4m3 bytes (as uint8) [S, 3, n, D] (gate rows, up
    rows, down^T rows) and `scale` their fp32 128 x 128 block scales [S, 3, n/128, Db], n the tile size (a multiple
    of 128); a shorter last tile of an expert is zero-padded (byte 0 is +0.0, so its padding adds nothing). `dense`
    dequantizes slots to `dtype` (the compute dtype) on the slab's device."""

    packed = True

    def __init__(
        self,
        blocks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
        tile: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        """blocks: unit -> its VRAM tiles as (float8_e4m3fn [3, n_i, D], fp32 scales [3, ceil(n_i/128), Db]), in
        neuron order (n_i <= tile)."""
        if tile % fp8.BLOCK:
            raise ValueError(f"FP8 slab tiles are whole {fp8.BLOCK}-neuron scale blocks, not {tile} neurons")
        count = sum(len(b) for b in blocks.values())
        data0, scale0 = next(b[0] for b in blocks.values() if b)
        d, db = data0.shape[-1], scale0.shape[-1]
        self.tile, self.hidden, self.dtype = tile, d, dtype
        self.data = torch.zeros(count, 3, tile, d, dtype=torch.uint8, device=device)
        self.scale = torch.zeros(count, 3, tile // fp8.BLOCK, db, dtype=torch.float32, device=device)
        self.slots: dict[int, tuple[int, int]] = {}  # unit -> (first slot, count)
        s = 0
        for unit, tiles in sorted(blocks.items()):
            self.slots[unit] = (s, len(tiles))
            for data, scale in tiles:
                self.data[s, :, : data.shape[1]] = data.view(torch.uint8).to(device)
                self.scale[s, :, : scale.shape[1]] = scale.to(device)
                s += 1

    @property
    def nbytes(self) -> int:
        """VRAM the slab takes: one byte per weight and 4 per scale block."""
        return self.data.numel() + 4 * self.scale.numel()

    def unit_bytes(self, unit: int) -> int:
        """VRAM bytes of one unit's (expert's) tiles."""
        return self.slots[unit][1] * self.nbytes // self.data.shape[0]

    def dense(self, slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [k, 2n, D] and down^T [k, n, D] of `slots` (ascending), dequantized to the compute dtype."""
        data, scale = _take(self.data, slots).view(fp8.FP8), _take(self.scale, slots)  # [k, 3, n, D], [k, 3, nb, Db]
        return self._dequantize(data[:, :2], scale[:, :2]), self._dequantize(data[:, 2:], scale[:, 2:])

    def _dequantize(self, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """float(data) * its block's scale (as `layers.fp8.dequantize`), in the compute dtype: data [k, p, n, D], scale
        [k, p, nb, Db] -> [k, p * n, D]. The scales are widened along D only (1/128 of the weights' size) and
        broadcast over each block's 128 rows."""
        k, p = data.shape[:2]
        cols = scale.repeat_interleave(fp8.BLOCK, -1)[..., : self.hidden]  # [k, p, nb, D]
        w = data.float().view(k, p, -1, fp8.BLOCK, self.hidden) * cols[:, :, :, None]  # [k, p, nb, 128, D] fp32
        return w.to(self.dtype).view(k, p * self.tile, self.hidden)


@dataclass(frozen=True)
class _GgmlGroup:
    """The slots of a GGUF slab whose units share quant types: slots [first, first + count)."""

    types: tuple[str, str, str]
    """gate, up and down's quant types."""
    first: int
    gate: torch.Tensor
    """uint8 [c, n, row_bytes(D)]: each slot's gate rows."""
    up: torch.Tensor
    """uint8 [c, n, row_bytes(D)]."""
    down: torch.Tensor
    """uint8 [c, D, row_bytes(n)]: each slot's blocks of down's rows (quant blocks run along a row)."""

    @property
    def count(self) -> int:
        return self.gate.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in (self.gate, self.up, self.down))


class GgmlSlab:
    """One layer's VRAM-resident GGUF tiles as the file stores them: per set of quant types its units use (routed
    experts share theirs; shared experts or a dense FFN may differ), gate and up rows [c, n, row_bytes(D)] and down's
    blocks [c, D, row_bytes(n)], n the tile size (a multiple of down's block); a shorter last tile of an expert is
    zero-padded (zero bytes decode to zero weights in every type). `dense` dequantizes slots to `dtype` (the compute
    dtype) on the slab's device."""

    packed = True

    def __init__(
        self,
        blocks: dict[int, list[tuple[ggml.GgmlMatrix, ggml.GgmlMatrix, ggml.GgmlMatrix]]],
        tile: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        """blocks: unit -> its VRAM tiles as (gate [n_i, D], up [n_i, D], down [D, n_i]) quantized matrices, in
        neuron order (n_i <= tile)."""
        by_types: dict[tuple[str, str, str], list[int]] = {}
        for unit, tiles in sorted(blocks.items()):
            if tiles:
                by_types.setdefault(tuple(m.qtype for m in tiles[0]), []).append(unit)
        self.tile, self.dtype = tile, dtype
        self.hidden = next(b[0][0].cols for b in blocks.values() if b)
        self.groups: list[_GgmlGroup] = []
        self.slots: dict[int, tuple[int, int]] = {}  # unit -> (first slot, count)
        s = 0
        for types, units in sorted(by_types.items()):
            g, u, dq = (ggml.QUANT_TYPES[q] for q in types)
            if tile % dq.weights:
                raise ValueError(f"GGUF slab tiles are whole {dq.weights}-weight {dq.name} blocks, not {tile} neurons")
            count, d = sum(len(blocks[e]) for e in units), self.hidden
            group = _GgmlGroup(
                types,
                s,
                torch.zeros(count, tile, g.row_bytes(d), dtype=torch.uint8, device=device),
                torch.zeros(count, tile, u.row_bytes(d), dtype=torch.uint8, device=device),
                torch.zeros(count, d, dq.row_bytes(tile), dtype=torch.uint8, device=device),
            )
            for unit in units:
                self.slots[unit] = (s, len(blocks[unit]))
                for gate, up, down in blocks[unit]:
                    i = s - group.first
                    group.gate[i, : gate.data.shape[0]] = gate.data.to(device)
                    group.up[i, : up.data.shape[0]] = up.data.to(device)
                    group.down[i, :, : down.data.shape[1]] = down.data.to(device)
                    s += 1
            self.groups.append(group)

    @property
    def nbytes(self) -> int:
        """VRAM the slab takes: the quant blocks' bytes."""
        return sum(g.nbytes for g in self.groups)

    def unit_bytes(self, unit: int) -> int:
        """VRAM bytes of one unit's (expert's) tiles."""
        first, count = self.slots[unit]
        group = next(g for g in self.groups if g.first <= first < g.first + g.count)
        return count * group.nbytes // group.count

    def dense(self, slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [k, 2n, D] and down^T [k, n, D] of `slots` (ascending), dequantized to the compute dtype."""
        gate_up, down_t = [], []
        for g in self.groups:  # in slot order: ascending slots keep their order
            local = [s - g.first for s in slots if g.first <= s < g.first + g.count]
            if not local:
                continue
            gate = ggml.dequantize(g.types[0], _take(g.gate, local), self.hidden)  # [k, n, D] fp32
            up = ggml.dequantize(g.types[1], _take(g.up, local), self.hidden)  # [k, n, D]
            down = ggml.dequantize(g.types[2], _take(g.down, local), self.tile)  # [k, D, n]
            gate_up.append(torch.cat([gate, up], 1).to(self.dtype))  # [k, 2n, D]
            down_t.append(down.transpose(1, 2).to(self.dtype))  # [k, n, D]
        if len(gate_up) == 1:
            return gate_up[0], down_t[0]
        return torch.cat(gate_up), torch.cat(down_t)
