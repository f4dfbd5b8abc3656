"""Expert FFNs on a GPU with few kernel launches and no host synchronisation.

A GPU finishes one small expert GEMV in microseconds, so a per-expert loop is bound by launches and
by the host reading routing results back. Two shapes cover the MoE work:
- `gathered_ffn` (decode, few tokens): every (token, expert-or-tile) pair at once. The weights of the
  pairs are gathered from a stacked tensor by index on the GPU, then two batched GEMMs; the gather
  copies each weight once, which costs less than the launches it saves at a few tokens.
- `stacked_ffn` (prefill, many tokens of one expert): all tiles of one expert in two batched GEMMs.

Shape legend: T tokens, P pairs, S stacked units (experts or tiles), n neurons per unit, D hidden.
"""

from __future__ import annotations

import torch

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


class TileSlab:
    """One layer's VRAM-resident tiles, stacked so any subset runs as one gathered GEMM: gate_up
    [S, 2n, D] and down^T [S, n, D], n the store's tile size (a shorter last tile of an expert is
    zero-padded: zero gate and up rows add act(0) * 0 = 0). Each expert's tiles take consecutive slots."""

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
