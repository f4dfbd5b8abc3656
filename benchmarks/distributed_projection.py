"""DeepSeek-V3 (FP8) on 4 nodes x 256 GiB vs one node streaming from NVMe: a projection on paper.

Not a benchmark and not a test: pure arithmetic over the published DeepSeek-V3 shape and the
assumptions below (every one a named constant, printed with the tables). It prints Markdown;
docs/distributed.md carries its output.

    .venv/bin/python benchmarks/distributed_projection.py

Shape: the published DeepSeek-V3 config.json (the repo's `deepseek_v3` family carries only its tiny
test preset; the `deepseek-v3.2` real-shape preset in tilemem/synth/presets.py has the same numbers
for every field used here). FP8 as DeepSeek publishes it: every linear of attention and the FFNs is
one e4m3 byte per weight plus one fp32 scale per 128 x 128 block; embeddings, LM head, routers and
norms are bf16. The MTP module (the checkpoint's layer 61) is not loaded for plain decoding and is
not counted.

Units: GiB (2^30 bytes) for memory capacities, GB (10^9 bytes) for traffic, as bandwidths are
quoted in GB/s.

Model of a decode step at batch 1 (one token):
- every rank holds and reads all the non-expert weights (attention, dense FFNs, routers, norms, LM
  head) and its KV cache;
- the experts are shared out as placement/rank_partition.py does for a uniform profile: whole
  experts balanced on expected load, the shared expert on one rank per layer (`expert_partition`);
  a token's 8 routed experts are drawn uniformly, so a rank computes 0-8 of them per layer;
- compute is bound by memory bandwidth (bytes read / DRAM_GBPS), on every rank;
- per MoE layer the ranks wait for the busiest one (the all-reduce is a barrier), then the
  all-reduce costs a bandwidth term and a latency term; once per step rank 0 broadcasts the batch;
- the single node reads what is resident from DRAM and the rest from NVMe, one after the other
  (a routed expert is known only after its layer's router, so little of the read hides behind
  compute).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# ---- DeepSeek-V3 shape (published config.json) ----
HIDDEN = 7168
LAYERS = 61
DENSE_LAYERS = 3  # first_k_dense_replace
ROUTED_EXPERTS = 256
SHARED_EXPERTS = 1
TOP_K = 8
MOE_INTERMEDIATE = 2048
DENSE_INTERMEDIATE = 18432
VOCAB = 129280
Q_LORA = 1536
KV_LORA = 512
HEADS = 128
QK_NOPE = 128
QK_ROPE = 64
V_HEAD = 128
MOE_LAYERS = LAYERS - DENSE_LAYERS

# ---- weight format ----
FP8_BLOCK = 128  # one fp32 scale per FP8_BLOCK x FP8_BLOCK block
BF16_BYTES = 2
KV_CACHE_BYTES = 2  # bf16 latent cache: (KV_LORA + QK_ROPE) values per token per layer

# ---- the cluster ----
NODES = 4
NODE_MEMORY_GIB = 256
RESERVE_GIB = 16  # OS, Python/torch, activations, the tile cache's slack: not for weights
CONTEXT_TOKENS = 32768  # KV cache kept per node (one sequence of this length)
DECODE_CONTEXT = 4096  # tokens attended per decode step in the tok/s projection
DRAM_GBPS = 200.0  # usable DRAM read bandwidth of one node (2-socket DDR5, one process), GB/s
LINKS_GBIT = (25, 100)  # Ethernet line rates compared, Gbit/s
LINK_EFFICIENCY = 0.9  # share of the line rate TCP payload reaches
HOP_LATENCY_US = 20.0  # one message hop over TCP (kernel stack, both ends): 10-30 us typical
HOP_LATENCY_RANGE_US = (10.0, 30.0)  # the sensitivity printed beside it
ALLREDUCE_DTYPE_BYTES = 4  # fp32 partial outputs
BATCHES = (1, 8, 64)  # decode rows per step in the network table

# ---- the single node it is compared with ----
NVME_DRIVES = 4
NVME_GBPS_PER_DRIVE = 7.0  # PCIe 4.0 x4 sequential read; expert tiles are MB-sized reads
SKEWED_DRAM_HIT = 0.75  # sensitivity: share of routed bytes served from DRAM under a skewed profile

GIB = 2**30
GB = 1e9


def fp8_linear(out_features: int, in_features: int) -> int:
    """Bytes of one FP8 linear: a byte per weight plus an fp32 scale per 128 x 128 block."""
    blocks = math.ceil(out_features / FP8_BLOCK) * math.ceil(in_features / FP8_BLOCK)
    return out_features * in_features + 4 * blocks


def ffn_bytes(intermediate: int) -> int:
    """gate, up [intermediate, HIDDEN] and down [HIDDEN, intermediate], FP8."""
    return 2 * fp8_linear(intermediate, HIDDEN) + fp8_linear(HIDDEN, intermediate)


def attention_bytes() -> int:
    """One MLA block: q_a, q_b, kv_a (with the rope key), kv_b, o in FP8; its two LoRA norms bf16."""
    q_head = QK_NOPE + QK_ROPE
    linears = (
        fp8_linear(Q_LORA, HIDDEN)
        + fp8_linear(HEADS * q_head, Q_LORA)
        + fp8_linear(KV_LORA + QK_ROPE, HIDDEN)
        + fp8_linear(HEADS * (QK_NOPE + V_HEAD), KV_LORA)
        + fp8_linear(HIDDEN, HEADS * V_HEAD)
    )
    return linears + (Q_LORA + KV_LORA) * BF16_BYTES


@dataclass(frozen=True)
class Weights:
    """Bytes of each part of the model."""

    expert: int  # one routed expert
    shared_ffn: int  # the shared experts of one MoE layer (one FFN of SHARED_EXPERTS x the width)
    routed: int  # every routed expert of every MoE layer
    shared: int  # the shared experts of every MoE layer
    dense: int  # the dense FFNs of the first layers
    attention: int  # every layer's MLA block
    routers: int  # router weights (bf16) and bias-correction terms (fp32)
    norms: int  # the layers' two RMSNorms and the final one
    embedding: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.routed + self.shared + self.non_expert

    @property
    def non_expert(self) -> int:
        """What every rank holds whole: attention, dense FFNs, routers, norms, embedding, LM head."""
        return self.dense + self.attention + self.routers + self.norms + self.embedding + self.lm_head

    @property
    def read_non_expert(self) -> int:
        """Non-expert bytes a decode token reads: all of them but the embedding (one row)."""
        return self.non_expert - self.embedding


def weights() -> Weights:
    expert = ffn_bytes(MOE_INTERMEDIATE)
    shared_ffn = ffn_bytes(SHARED_EXPERTS * MOE_INTERMEDIATE)
    return Weights(
        expert=expert,
        shared_ffn=shared_ffn,
        routed=MOE_LAYERS * ROUTED_EXPERTS * expert,
        shared=MOE_LAYERS * shared_ffn,
        dense=DENSE_LAYERS * ffn_bytes(DENSE_INTERMEDIATE),
        attention=LAYERS * attention_bytes(),
        routers=MOE_LAYERS * (ROUTED_EXPERTS * HIDDEN * BF16_BYTES + ROUTED_EXPERTS * 4),
        norms=(2 * LAYERS + 1) * HIDDEN * BF16_BYTES,
        embedding=VOCAB * HIDDEN * BF16_BYTES,
        lm_head=VOCAB * HIDDEN * BF16_BYTES,
    )


def kv_bytes_per_token() -> int:
    """MLA caches one latent (KV_LORA) plus the rope key (QK_ROPE) per token per layer."""
    return LAYERS * (KV_LORA + QK_ROPE) * KV_CACHE_BYTES


@dataclass(frozen=True)
class Share:
    """One rank's share of every MoE layer."""

    routed: int  # routed experts it holds whole, per layer
    shared: bool  # whether it holds the layer's shared experts


def expert_partition(nodes: int) -> list[Share]:
    """Whole experts balanced on expected load under a uniform profile, as placement/rank_partition.py
    balances them (hottest first to the least loaded rank): the shared experts (routed for every
    token) to one rank, then routed experts (TOP_K / ROUTED_EXPERTS each) filling every rank to the
    mean load. Under a uniform profile no expert is hotter than the mean rank load, so neither
    `--rank-split tile` nor replication cuts or copies any."""
    if nodes == 1:
        return [Share(ROUTED_EXPERTS, True)]
    mean_load = (TOP_K + SHARED_EXPERTS) / nodes
    first = max(0, min(ROUTED_EXPERTS, round((mean_load - SHARED_EXPERTS) * ROUTED_EXPERTS / TOP_K)))
    rest, others = ROUTED_EXPERTS - first, nodes - 1
    return [Share(first, True)] + [Share(rest // others + (i < rest % others), False) for i in range(others)]


def share_bytes(w: Weights, share: Share) -> int:
    """Expert bytes one rank holds over all MoE layers."""
    return MOE_LAYERS * (share.routed * w.expert + share.shared * w.shared_ffn)


def compositions(total: int, parts: int) -> list[tuple[int, ...]]:
    """Every way to write `total` as `parts` non-negative integers, in order."""
    if parts == 1:
        return [(total,)]
    return [(first, *rest) for first in range(total + 1) for rest in compositions(total - first, parts - 1)]


def busiest_rank_bytes(w: Weights, shares: list[Share]) -> float:
    """Expected expert bytes of the busiest rank in one MoE layer for one token: its TOP_K distinct
    routed experts drawn uniformly (multivariate hypergeometric over the ranks' holdings) plus the
    shared experts. The all-reduce at the layer's end waits for this rank."""
    ways = math.comb(ROUTED_EXPERTS, TOP_K)
    expected = 0.0
    for counts in compositions(TOP_K, len(shares)):
        weight = math.prod(math.comb(s.routed, c) for s, c in zip(shares, counts, strict=True))
        if weight:
            busiest = max(c * w.expert + s.shared * w.shared_ffn for s, c in zip(shares, counts, strict=True))
            expected += busiest * weight / ways
    return expected


@dataclass(frozen=True)
class Comm:
    """Network cost of one decode step on one link speed."""

    gbit: int
    bytes_per_layer: float  # each rank sends (and receives) this per MoE layer
    bandwidth_s: float  # per step, all MoE layers
    latency_s: float  # per step: all-reduce hops + the step broadcast

    @property
    def total_s(self) -> float:
        return self.bandwidth_s + self.latency_s


def comm(gbit: int, nodes: int, hop_us: float, tokens: int = 1) -> Comm:
    """One decode step of `tokens` rows. Ring all-reduce of an fp32 [tokens, HIDDEN] buffer per MoE
    layer: each rank sends and receives 2(N-1)/N of it in 2(N-1) hops; the per-step broadcast of
    the batch (a few ints per row) adds ceil(log2 N) hops."""
    buffer = tokens * HIDDEN * ALLREDUCE_DTYPE_BYTES
    per_layer = 2 * (nodes - 1) / nodes * buffer
    link = gbit * 1e9 / 8 * LINK_EFFICIENCY
    hops = MOE_LAYERS * 2 * (nodes - 1) + math.ceil(math.log2(nodes))
    return Comm(gbit, per_layer, MOE_LAYERS * per_layer / link, hops * hop_us * 1e-6)


@dataclass(frozen=True)
class Decode:
    """One row of the decode table."""

    setup: str
    dram_bytes: float  # read from DRAM per token on the critical path (the busiest rank)
    disk_bytes: float  # read from NVMe per token
    net_s: float

    @property
    def seconds(self) -> float:
        disk_gbps = NVME_DRIVES * NVME_GBPS_PER_DRIVE
        return self.dram_bytes / (DRAM_GBPS * GB) + self.disk_bytes / (disk_gbps * GB) + self.net_s


def node_memory(w: Weights, nodes: int) -> dict[str, float]:
    """One node's memory when `nodes` ranks share the experts: experts as the mean share and as the
    fullest rank's share when the partition balances expected load (expert_partition)."""
    return {
        "mean": (w.routed + w.shared) / nodes,
        "fullest": max(share_bytes(w, s) for s in expert_partition(nodes)),
        "fixed": w.non_expert + CONTEXT_TOKENS * kv_bytes_per_token() + RESERVE_GIB * GIB,
    }


def decode_rows(w: Weights) -> list[Decode]:
    routed_per_token = MOE_LAYERS * TOP_K * w.expert
    experts_per_token = routed_per_token + MOE_LAYERS * w.shared_ffn
    base = w.read_non_expert + DECODE_CONTEXT * kv_bytes_per_token()

    # one node: non-expert weights, shared experts, KV cache and reserve first; routed experts in the rest
    room = NODE_MEMORY_GIB * GIB - w.non_expert - w.shared - CONTEXT_TOKENS * kv_bytes_per_token() - RESERVE_GIB * GIB
    resident = max(0.0, min(1.0, room / w.routed))
    single = base + MOE_LAYERS * w.shared_ffn
    rows = [
        Decode(
            f"1 node, {resident:.0%} of routed experts resident, uniform profile",
            single + resident * routed_per_token,
            (1 - resident) * routed_per_token,
            0.0,
        ),
        Decode(
            f"1 node, skewed profile ({SKEWED_DRAM_HIT:.0%} of routed bytes from DRAM)",
            single + SKEWED_DRAM_HIT * routed_per_token,
            (1 - SKEWED_DRAM_HIT) * routed_per_token,
            0.0,
        ),
    ]
    shares = expert_partition(NODES)
    busiest = busiest_rank_bytes(w, shares)
    for gbit in LINKS_GBIT:
        net = comm(gbit, NODES, HOP_LATENCY_US).total_s
        rows.append(
            Decode(f"{NODES} nodes, whole experts as planned, {gbit} GbE", base + MOE_LAYERS * busiest, 0.0, net)
        )
        rows.append(
            Decode(
                f"{NODES} nodes, every expert cut in {NODES} tile ranges (not planned today), {gbit} GbE",
                base + experts_per_token / NODES,
                0.0,
                net,
            )
        )
    rows.append(Decode("reference: 1 node holding everything in DRAM (~1 TiB)", base + experts_per_token, 0.0, 0.0))
    return rows


def gb(x: float) -> str:
    return f"{x / GB:.2f} GB"


def gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB"


ASSUMPTIONS = {
    "NODES": "nodes (ranks), one per machine",
    "NODE_MEMORY_GIB": "memory of each node",
    "RESERVE_GIB": "kept free for the OS, torch, activations and slack",
    "CONTEXT_TOKENS": "KV cache each node keeps (one sequence this long)",
    "DECODE_CONTEXT": "tokens attended per decode step",
    "DRAM_GBPS": "usable DRAM read bandwidth of one node (2-socket DDR5, one process), GB/s",
    "LINKS_GBIT": "Ethernet line rates compared, Gbit/s",
    "LINK_EFFICIENCY": "share of the line rate TCP payload reaches",
    "HOP_LATENCY_US": "one message hop over TCP, both kernel stacks, us",
    "HOP_LATENCY_RANGE_US": "the latency range printed beside it, us",
    "ALLREDUCE_DTYPE_BYTES": "bytes per value of the summed partial outputs (fp32)",
    "BATCHES": "decode rows per step in the network table",
    "NVME_DRIVES": "NVMe drives of the single node, striped",
    "NVME_GBPS_PER_DRIVE": "sequential read per drive, GB/s (expert tiles are MB-sized reads)",
    "SKEWED_DRAM_HIT": "sensitivity: share of routed bytes served from DRAM under a skewed profile",
}


def main() -> int:
    w = weights()
    moe = MOE_LAYERS
    print("#### Assumptions\n")
    print("| constant | value | meaning |\n|---|---|---|")
    for name, meaning in ASSUMPTIONS.items():
        print(f"| `{name}` | {globals()[name]} | {meaning} |")

    shares = expert_partition(NODES)
    held = ", ".join(f"{s.routed}{' + shared' if s.shared else ''}" for s in shares)
    print(f"\n#### Weights: {gib(w.total)} (FP8 linears; bf16 embedding, LM head, routers, norms)\n")
    print(f"| part | bytes | on {NODES} nodes |\n|---|---|---|")
    print(
        f"| routed experts ({moe} layers x {ROUTED_EXPERTS} x {w.expert / 1e6:.1f} MB) | {gib(w.routed)} "
        f"| shared out: experts per layer per rank {held} |"
    )
    print(f"| shared experts | {gib(w.shared)} | one rank per layer, balanced with the routed ones |")
    for name, size in (
        (f"dense FFNs (first {DENSE_LAYERS} layers)", w.dense), ("attention (MLA)", w.attention),
        ("routers", w.routers), ("norms", w.norms), ("embedding", w.embedding), ("LM head", w.lm_head),
    ):  # fmt: skip
        print(f"| {name} | {gib(size)} | every rank |")

    kv, reserve = CONTEXT_TOKENS * kv_bytes_per_token(), RESERVE_GIB * GIB
    print(
        f"\n#### Memory per node: non-expert weights {gib(w.non_expert)} + KV cache ({CONTEXT_TOKENS} tokens) "
        f"{gib(kv)} + reserve {gib(reserve)} + its experts\n"
    )
    print(
        "| nodes | experts (mean share) | experts (fullest rank, load-balanced) | total (fullest) "
        f"| fits {NODE_MEMORY_GIB} GiB |\n|---|---|---|---|---|"
    )
    limit = NODE_MEMORY_GIB * GIB
    for n in range(1, NODES + 1):
        m = node_memory(w, n)
        if m["fixed"] + m["fullest"] <= limit:
            fits = "yes"
        elif m["fixed"] + m["mean"] <= limit:
            fits = "yes, with bytes balanced instead (the planner caps each rank at its room)"
        else:
            fits = f"no ({gib(m['fixed'] + m['mean'] - limit)} over at the mean share)"
        print(f"| {n} | {gib(m['mean'])} | {gib(m['fullest'])} | {gib(m['fixed'] + m['fullest'])} | {fits} |")

    c1 = comm(LINKS_GBIT[0], NODES, HOP_LATENCY_US)
    print(f"\n#### All-reduce, {NODES} ranks (ring, fp32 [tokens, {HIDDEN}])\n")
    print(
        f"Per token and MoE layer each rank sends {c1.bytes_per_layer / 1e3:.1f} kB and receives as much "
        f"({moe * c1.bytes_per_layer / 1e6:.2f} MB each way per token over {moe} MoE layers); per step "
        f"{moe} all-reduces of {2 * (NODES - 1)} hops each and one broadcast of the batch.\n"
    )
    lo_us, hi_us = HOP_LATENCY_RANGE_US
    print(
        f"| link | tokens per step | bandwidth time | latency time ({HOP_LATENCY_US:g} us/hop) | network per step "
        f"| latency at {lo_us:g}-{hi_us:g} us/hop |\n|---|---|---|---|---|---|"
    )
    for gbit in LINKS_GBIT:
        for batch in BATCHES:
            c = comm(gbit, NODES, HOP_LATENCY_US, batch)
            lo, hi = (comm(gbit, NODES, us, batch).latency_s for us in HOP_LATENCY_RANGE_US)
            print(
                f"| {gbit} GbE | {batch} | {c.bandwidth_s * 1e3:.2f} ms | {c.latency_s * 1e3:.2f} ms "
                f"| {c.total_s * 1e3:.2f} ms | {lo * 1e3:.1f}-{hi * 1e3:.1f} ms |"
            )

    print(
        f"\n#### Decode at batch 1 ({DECODE_CONTEXT}-token context, DRAM {DRAM_GBPS:g} GB/s, NVMe "
        f"{NVME_DRIVES} x {NVME_GBPS_PER_DRIVE:g} GB/s)\n"
    )
    rows = decode_rows(w)
    print(
        "| setup | DRAM read per token (busiest rank) | NVMe read per token | network | ms/token | tok/s "
        "| vs row 1 |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r.setup} | {gb(r.dram_bytes)} | {gb(r.disk_bytes)} | {r.net_s * 1e3:.1f} ms "
            f"| {r.seconds * 1e3:.0f} | {1 / r.seconds:.1f} | {rows[0].seconds / r.seconds:.1f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
