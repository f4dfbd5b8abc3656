"""Which decoder layers a decode step runs in one portable native call (`kernels.portable_decode`), and their weights
described for it: the layers the AVX512 library's fused layers leave (all of them where it does not run) that the
modules would run through the portable kernels anyway: GQA `Attention` with halves rope through the paged decode
block, or DeepSeek's `MLAttention` (latent cache, absorbed decode, interleaved or halves rope); linears in bf16, FP8
or GGUF blocks; a softmax greedy router on a bf16 weight (bf16 or fp32 logits); `ResidentExperts` through one fused
FFN kernel; shared experts with or without their sigmoid gate. So the call computes what the modules compute,
rounding where they round. Dense FFN layers, group-limited or sigmoid routing and DSA stay modules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from tilemem import kernels
from tilemem.kernels import bf16 as bf16_kernels
from tilemem.kernels import bf16_ffn as bf16_ffn_kernels
from tilemem.kernels import fp8 as fp8_kernels
from tilemem.kernels import ggml as ggml_kernels
from tilemem.kernels import paged_decode, portable_decode
from tilemem.layers import ggml
from tilemem.layers.attention import Attention
from tilemem.layers.fp8 import FP8
from tilemem.layers.linear import SLOW_HALF_GEMM, Linear
from tilemem.layers.mla import MLAttention
from tilemem.layers.mlp import fused_applies, fused_ffn
from tilemem.layers.moe import MoEBlock, ResidentExperts
from tilemem.layers.rope import RotaryEmbedding

if TYPE_CHECKING:
    from tilemem.models.model import DecoderLayer

FFN_FORMATS = {ggml_kernels: "ggml", fp8_kernels: "fp8", bf16_ffn_kernels: "bf16"}
"""A fused FFN kernel module (`layers.mlp.FusedFFN.kernel`) -> its format in `kernels.portable_decode`."""


def applies(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a model of activations `dtype` on `device` can decode through the portable layers: bf16 on the CPU
    where the portable kernels run (with the AVX512 library too: its own fused layers come first, `fused_layers`)."""
    return (
        dtype == torch.bfloat16 and device.type == "cpu" and portable_decode.available() and paged_decode.available()
    )  # fmt: skip


class Dispatch:
    """The AVX512 library's fused runs (`kernels.NativeDecode`) and the portable runs (`PortableDecode`, built for
    the layers the AVX512 ones leave) of one model, as one: `run_length` and `forward` go to whichever owns the run
    starting at a layer (the AVX512 one first)."""

    def __init__(self, native: kernels.NativeDecode, portable: portable_decode.PortableDecode) -> None:
        self.native, self.portable = native, portable
        self.key = portable.key
        """What the portable layers were built for (the model compares it to rebuild them)."""

    def run_length(self, first: int, cache: object, keys: Sequence[torch.Tensor]) -> int:
        """Layers of the run starting at layer `first` (0: it runs as modules)."""
        return self.native.run_length(first, cache, keys) or self.portable.run_length(first, cache, keys)

    def forward(self, first: int, x: torch.Tensor, *args) -> torch.Tensor:
        """The run starting at layer `first` (`kernels.NativeDecode.forward`'s arguments) through its library."""
        owner = self.native if first in self.native.runs else self.portable
        return owner.forward(first, x, *args)


def fused_layers(
    layers: Sequence[DecoderLayer], rope: RotaryEmbedding, dtype: torch.dtype, device: torch.device
) -> kernels.NativeDecode | portable_decode.PortableDecode | Dispatch | None:
    """A decode step's fused dispatch for the model's decoder `layers`: the AVX512 library's fused layers where it
    runs (`DecoderLayer.native_decode`), the portable ones (`portable_layer`) for the layers it leaves (all of them
    without it; an FP8 or GGUF model's with it), both (`Dispatch`) where each takes some; None where neither runs
    (not bf16 on the CPU, no kernels)."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return None
    native = kernels.NativeDecode([layer.native_decode(rope) for layer in layers]) if kernels.available() else None
    if not applies(dtype, device):
        return native
    taken = native.layers if native is not None else [None] * len(layers)
    portable = portable_decode.PortableDecode(
        [None if t is not None else portable_layer(layer, rope) for layer, t in zip(layers, taken, strict=True)], key()
    )
    if native is None or not portable.runs:
        return portable if native is None else native
    return portable if not native.runs else Dispatch(native, portable)


def key() -> object:
    """What the built layers depend on besides the weights and executor: GGUF's exact-or-fast choice."""
    return ggml.FAST


def linear_of(m: Linear) -> tuple[portable_decode.LinearW, tuple] | None:
    """The Linear's weight for the kernel, or None where the module computes it another way (an x12 weight, bf16 on
    a CPU whose torch bf16 GEMM is fast, a transposed FP8 matrix, kernels unavailable)."""
    w, bias = m.weight, m.bias
    if m.qtype is not None:
        if m.qtype not in ggml_kernels.QTYPES or ggml._native() is None:
            return None
        return portable_decode.linear(
            w, "ggml", m.in_features, bias, None, ggml_kernels.TYPE_IDS[m.qtype], not ggml.FAST
        )
    if w.dtype == FP8:
        ok = fp8_kernels.available() and m.matrix.transposed is False
        return portable_decode.linear(w, "fp8", m.in_features, bias, m.weight_scale_inv) if ok else None
    if m.x12 is not None or not ((SLOW_HALF_GEMM[torch.bfloat16] or m.portable) and bf16_kernels.available()):
        return None
    return portable_decode.linear(w, "bf16", m.in_features, bias)


def portable_layer(layer: DecoderLayer, rope: RotaryEmbedding) -> portable_decode.Layer | None:
    """`layer` described for the portable one-call decode step, or None where its modules must run: attention other
    than `Attention` (halves rope) or `MLAttention` (`mla_of`), a dense FFN, routing other than softmax greedy top-k
    (on bf16 logits, or fp32 ones from a bf16 router weight), experts not resident or not all through one fused FFN
    kernel, shared experts it cannot run (`shared_of`), expert parallelism, weights the kernel lacks."""
    attn, mlp = layer.self_attn, layer.mlp
    mla = type(attn) is MLAttention
    if not isinstance(mlp, MoEBlock) or not (mla or (isinstance(attn, Attention) and not rope.interleave)):
        return None
    cfg = mlp.gate.cfg
    if (cfg.scoring_func, cfg.topk_method, cfg.router_bias) != ("softmax", "greedy", False):
        return None
    if not isinstance(mlp.executor, ResidentExperts) or mlp.reduce is not None or (shared := shared_of(mlp)) is False:
        return None
    routed = mlp.executor.fused(layer.layer)
    if routed is None or mlp.act_name not in routed[0].kernel.ACTS:
        return None
    fused, table = routed
    probe = torch.empty(1, dtype=torch.bfloat16)  # activations: bf16 CPU rows
    if not fused_applies(fused, probe) or fused.kernel not in FFN_FORMATS:
        return None
    router = mlp.gate.weight
    slow = SLOW_HALF_GEMM[torch.bfloat16] or mlp.gate.portable
    if router.dtype != torch.bfloat16 or not slow or not bf16_kernels.available():
        return None
    gate = portable_decode.linear(router, "bf16", router.shape[1])
    if mla:
        attn_part = mla_of(attn, rope)
    else:
        attn_part = gqa_of(attn)
    if gate is None or attn_part is None:
        return None
    linears, heads, norm, extra = attn_part
    return portable_decode.layer(
        linears, gate, (layer.input_layernorm.weight, layer.post_attention_layernorm.weight),
        layer.input_layernorm.eps, heads, *norm, attn.scale,
        (cfg.num_experts, cfg.top_k, cfg.norm_topk_prob, cfg.router_weights_in_model_dtype,
         cfg.routed_scaling_factor),
        FFN_FORMATS[fused.kernel], table.words, mlp.act_name, not ggml.FAST, shared, cfg.router_fp32, extra,
    )  # fmt: skip


AttnPart = tuple[list, tuple[int, int, int], tuple, "portable_decode.MLA | None"]
"""An attention's part of `portable_decode.layer`: its q, k, v, o linears, heads (H, Hkv, hd), (q/k norm, its weights,
epsilon, clip) and its MLA weights (None for GQA)."""


def gqa_of(attn: Attention) -> AttnPart | None:
    """GQA `Attention` for `portable_decode.layer`, or None where the kernel does not take it."""
    linears = [linear_of(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
    if None in linears or attn.hd % 2:
        return None
    norms = (attn.q_norm, attn.k_norm) if attn.qk_norm != "none" else ()
    weights = tuple(n.weight for n in norms) or None
    return (
        linears,
        (attn.h, attn.hkv, attn.hd),
        (attn.qk_norm, weights, norms[0].eps if norms else 0.0, attn.clip),
        None,
    )


def mla_of(attn: MLAttention, rope: RotaryEmbedding) -> AttnPart | None:
    """`MLAttention` for `portable_decode.layer` (its absorbed kv_b_proj, decoded once as the module does), or None
    where the kernel does not take it (a linear it lacks, an absorbed weight not in bf16)."""
    q_a = q_b = q = None
    if attn.q_lora:
        q_a, q_b = linear_of(attn.q_a_proj), linear_of(attn.q_b_proj)
        if q_a is None or q_b is None:
            return None
    elif (q := linear_of(attn.q_proj)) is None:
        return None
    kv_a, o = linear_of(attn.kv_a_proj_with_mqa), linear_of(attn.o_proj)
    w_uk, _ = attn.absorbed()  # [H, dn, R], a view of [H, dn + dv, R]
    h, r, dn, dv = attn.h, attn.rank, attn.dn, attn.dv
    if kv_a is None or o is None or w_uk.dtype != torch.bfloat16 or w_uk.stride() != ((dn + dv) * r, r, 1):
        return None
    w_kv = w_uk.as_strided((h, dn + dv, r), ((dn + dv) * r, r, 1))  # [H, dn + dv, R]
    mla = portable_decode.MLA(
        q_a, q_b, kv_a, attn.q_a_layernorm.weight if attn.q_lora else None, attn.kv_a_layernorm.weight,
        attn.kv_a_layernorm.eps, (r, dn, attn.dr, dv), rope.interleave, w_kv,
    )  # fmt: skip
    return [q, None, None, o], (h, 1, attn.dr), ("none", None, 0.0, None), mla


def shared_of(mlp: MoEBlock) -> tuple | None | bool:
    """The MoE block's shared experts for `kernels.portable_decode.layer` (format, packed words, sigmoid gate), None
    without any, False where the kernel cannot run them as the module does (placed by the tiered runtime, weights no
    fused FFN kernel takes, a gate it cannot read)."""
    ffn = mlp.shared_experts
    if ffn is None:
        return None
    fused = fused_ffn(ffn)
    probe = torch.empty(1, dtype=torch.bfloat16)
    if ffn.tiled is not None or fused is None or fused.kernel not in FFN_FORMATS or not fused_applies(fused, probe):
        return False
    gate = None
    if mlp.shared_expert_gate is not None and (gate := linear_of(mlp.shared_expert_gate)) is None:
        return False
    words = torch.tensor(fused.weights.words, dtype=torch.int64)  # [W]: pointers into the FFN's own weights
    return FFN_FORMATS[fused.kernel], words, gate


def portable_decode_layers(layers: Sequence[DecoderLayer], rope: RotaryEmbedding) -> portable_decode.PortableDecode:
    """The model's decoder `layers` for `kernels.portable_decode.PortableDecode` (None: a layer runs as modules)."""
    return portable_decode.PortableDecode([portable_layer(layer, rope) for layer in layers], key())
