"""Topology: what a placement policy needs to know about a model, without any tensors.

Per layer: dense or MoE, routed experts with their width, shared experts, dense FFN width; the
bytes of every expert FFN; and the non-expert weights (attention, norms, router, embeddings, LM
head) with their bytes, which are always placed first in the fastest tier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from tilemem.config import ModelConfig
from tilemem.layers.fp8 import scale_shape
from tilemem.layers.ggml import QUANT_TYPES

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "bf16": 2, "fp16": 2, "fp32": 4, "fp8_e4m3": 1}
FP8_FORMAT = "fp8_e4m3"
KV_WEIGHTS = ("k_proj.weight", "v_proj.weight", "kv_a_proj_with_mqa.weight")
"""The weights whose outputs the KV cache holds per token: the k and v projections, MLA's latent projection."""
"""Topology.dtype of an FP8 checkpoint: one byte per weight plus an fp32 scale per 128x128 block."""


def matrix_bytes(rows: int, cols: int, dtype: str) -> int:
    """Bytes of an [rows, cols] weight stored in `dtype` (FP8: its block scales included; a GGUF quant type such
    as `q4_k`: its blocks, `cols` a multiple of the type's block)."""
    if dtype in QUANT_TYPES:
        return rows * QUANT_TYPES[dtype].row_bytes(cols)
    nbytes = rows * cols * DTYPE_BYTES.get(dtype, 2)
    if dtype == FP8_FORMAT:
        nbytes += 4 * math.prod(scale_shape(rows, cols))
    return nbytes


SHARED = -1
"""Expert index standing for a layer's fused shared experts (the runtime and tile keys use it too)."""
DENSE = -2
"""Expert index standing for a dense layer's FFN."""


def our_ffn_prefix(layer: int, expert: int) -> str:
    """TileMEM module name of an FFN: routed expert, SHARED or DENSE."""
    if expert == SHARED:
        return f"model.layers.{layer}.mlp.shared_experts"
    if expert == DENSE:
        return f"model.layers.{layer}.mlp"
    return f"model.layers.{layer}.mlp.experts.{expert}"


@dataclass(frozen=True)
class LayerTopology:
    """One decoder layer's FFN structure."""

    index: int
    """Layer number."""
    is_moe: bool
    """Routes tokens to experts (else a dense FFN)."""
    num_experts: int
    """Routed experts (0 for dense layers)."""
    top_k: int
    """Experts per token (0 for dense layers)."""
    expert_intermediate: int
    """Width I of one routed expert."""
    shared_intermediate: int
    """Total width of the (fused) shared experts; 0 if none."""
    dense_intermediate: int
    """Width of the dense FFN (dense layers only; else 0)."""


@dataclass(frozen=True)
class Topology:
    """A model's layers, widths, dtype and non-expert weights: the shape placement plans with, without
    tensors. Built from a `ModelConfig` (`from_config`) or an SDK `ModelSpec` (`ModelSpec.topology()`)."""

    family: str
    """Model family."""
    hidden_size: int
    """Residual width D."""
    dtype: str
    """Weight dtype name, e.g. `bfloat16`."""
    dtype_bytes: int
    """Bytes per weight element."""
    layers: tuple[LayerTopology, ...]
    """Per-layer FFN structure."""
    non_expert: tuple[tuple[str, int], ...]
    """(checkpoint-style module name, bytes) of every weight that is not an FFN tile."""
    non_expert_params: int | None = None
    """Parameters of `non_expert` (None: its bytes over `dtype_bytes`, fp32 biases over 4)."""
    ffn_types: tuple[tuple[int, int, str, str, str], ...] = ()
    """GGUF: (layer, unit, gate type, up type, down type) of every FFN, quant types such as `q4_k` (unit: 0 for
    the routed experts, which share their layer's types, SHARED or DENSE); FFN bytes are then their blocks'.
    Empty: every FFN is stored in `dtype`."""
    kv_widths: tuple[tuple[str, int], ...] = ()
    """(name, output width) of every `KV_WEIGHTS` weight: the values per token the KV cache holds for it, whatever
    the weight's format. Empty in plans saved before it was recorded (`kv_values` then derives it from bytes)."""

    @staticmethod
    def layers_of(cfg: ModelConfig) -> tuple[LayerTopology, ...]:
        """Per-layer FFN structure of `cfg` (cheap: builds no model, unlike `from_config`)."""
        return tuple(
            LayerTopology(
                index=i,
                is_moe=cfg.is_moe_layer(i),
                num_experts=cfg.num_experts if cfg.is_moe_layer(i) else 0,
                top_k=cfg.top_k if cfg.is_moe_layer(i) else 0,
                expert_intermediate=cfg.moe_intermediate_size if cfg.is_moe_layer(i) else 0,
                shared_intermediate=(
                    cfg.num_shared_experts * cfg.shared_intermediate_size if cfg.is_moe_layer(i) else 0
                ),
                dense_intermediate=0 if cfg.is_moe_layer(i) else cfg.intermediate_size,
            )
            for i in range(cfg.num_layers)
        )

    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        dtype: str | None = None,
        ffn_types: dict[tuple[int, int], tuple[str, ...]] | None = None,
        quantized: dict[str, int] | None = None,
    ) -> Topology:
        """Topology of `cfg` stored in `dtype` (default: the checkpoint's: `fp8_e4m3` for an FP8 checkpoint,
        whose quantized weights count one byte each plus their scales, its other weights `torch_dtype`).
        `ffn_types`: a GGUF file's quant types per FFN unit ((layer, unit) -> gate, up, down; see `ffn_types`);
        `quantized`: its other quantized weights' bytes as stored (our name -> bytes)."""
        from tilemem.models.model import MoECausalLM, quantized_weight_names

        dtype = dtype or cfg.weight_format or cfg.torch_dtype
        plain = cfg.torch_dtype if dtype == FP8_FORMAT else dtype
        model = MoECausalLM(cfg)
        fp8 = quantized_weight_names(model, cfg) if dtype == FP8_FORMAT else set()
        layers = cls.layers_of(cfg)
        non_expert, params = [], 0
        for name, t in model.state_dict(keep_vars=True).items():
            # MTP layers (`mtp.*`, experts included) are non-expert weights: the model keeps them resident.
            if (is_ffn_weight(name) and not name.startswith("mtp.")) or (
                cfg.tie_word_embeddings and name == "lm_head.weight"
            ):
                continue
            if quantized and name in quantized:
                nbytes = quantized[name]
            elif name in fp8:
                nbytes = matrix_bytes(*t.shape, FP8_FORMAT)
            else:
                size = 4 if name.endswith("e_score_correction_bias") else DTYPE_BYTES.get(plain, 2)
                nbytes = math.prod(t.shape) * size
            non_expert.append((name, nbytes))
            params += math.prod(t.shape)
        types = tuple(sorted((layer, unit, *t) for (layer, unit), t in (ffn_types or {}).items()))
        state = model.state_dict(keep_vars=True)
        kv = tuple((name, t.shape[0]) for name, t in state.items() if name.endswith(KV_WEIGHTS))
        return cls(
            cfg.family, cfg.hidden_size, dtype, DTYPE_BYTES.get(dtype, 2), layers, tuple(non_expert), params, types, kv
        )

    def kv_values(self) -> list[tuple[str, int]]:
        """(name, values per token) the KV cache holds for each `KV_WEIGHTS` weight: `kv_widths`, or for a plan
        saved without them the weights' bytes over the hidden size and `dtype_bytes` (exact for plain dtypes)."""
        if self.kv_widths:
            return list(self.kv_widths)
        d = self.hidden_size * self.dtype_bytes
        return [(name, nbytes // d) for name, nbytes in self.non_expert if name.endswith(KV_WEIGHTS)]

    @property
    def kv_element_bytes(self) -> int:
        """Bytes of one KV cache value: the activations' dtype (an FP8 or GGUF model's too: bf16), not the weights'."""
        return DTYPE_BYTES["bfloat16"] if self.dtype == FP8_FORMAT else self.dtype_bytes

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one routed expert (gate, up, down) in `layer`."""
        return self.ffn_bytes(self.layers[layer].expert_intermediate, self._types(layer, 0))

    @cached_property
    def _type_map(self) -> dict[tuple[int, int], tuple[str, str, str]]:
        """`ffn_types` by (layer, unit), built once (planners ask for every tile unit)."""
        return {(t[0], t[1]): tuple(t[2:]) for t in self.ffn_types}

    def _types(self, layer: int, unit: int) -> tuple[str, str, str] | None:
        """The quant types of one FFN unit (GGUF), else None."""
        return self._type_map.get((layer, unit))

    def unit_types(self, layer: int, expert: int) -> tuple[str, str, str] | None:
        """GGUF: the gate, up and down quant types of FFN (layer, expert) (a routed expert: its layer's stack's;
        SHARED, DENSE); None where the FFN is stored in `dtype`."""
        return self._types(layer, 0 if expert >= 0 else expert)

    def ffn_bytes(self, intermediate: int, types: tuple[str, str, str] | None = None) -> int:
        """Bytes of a gated FFN of width `intermediate` (FP8: with the scales of its three matrices; `types`:
        GGUF gate, up and down quant types, their blocks)."""
        if not intermediate:
            return 0
        if types is not None:
            d = self.hidden_size
            return sum(matrix_bytes(intermediate, d, q) for q in types[:2]) + matrix_bytes(d, intermediate, types[2])
        return 3 * matrix_bytes(intermediate, self.hidden_size, self.dtype)

    @property
    def moe_layers(self) -> list[int]:
        """Indices of MoE layers."""
        return [lt.index for lt in self.layers if lt.is_moe]

    @property
    def routed_expert_bytes(self) -> int:
        """All routed experts, all layers."""
        return sum(lt.num_experts * self.expert_bytes(lt.index) for lt in self.layers)

    @property
    def shared_and_dense_bytes(self) -> int:
        """Shared experts plus dense FFN layers."""
        return sum(
            self.ffn_bytes(
                lt.shared_intermediate + lt.dense_intermediate, self._types(lt.index, SHARED if lt.is_moe else DENSE)
            )
            for lt in self.layers
        )

    @property
    def non_expert_bytes(self) -> int:
        """Attention, norms, routers, embeddings, LM head."""
        return sum(b for _, b in self.non_expert)

    @property
    def total_bytes(self) -> int:
        """Every weight."""
        return self.routed_expert_bytes + self.shared_and_dense_bytes + self.non_expert_bytes

    @property
    def total_params(self) -> int:
        """Parameter count (e_score_correction_bias counted as parameters)."""
        d = self.hidden_size
        ffn = sum(3 * d * (lt.num_experts * lt.expert_intermediate + lt.shared_intermediate + lt.dense_intermediate)
                  for lt in self.layers)  # fmt: skip
        if self.non_expert_params is not None:
            return ffn + self.non_expert_params
        fp32 = sum(b for n, b in self.non_expert if n.endswith("e_score_correction_bias"))
        return ffn + (self.non_expert_bytes - fp32) // self.dtype_bytes + fp32 // 4

    @property
    def active_params(self) -> int:
        """Parameters of one token's forward: top-k routed experts, embedding and LM head both counted
        (DeepSeek's published figures leave the embedding out)."""
        idle = sum(3 * self.hidden_size * (lt.num_experts - lt.top_k) * lt.expert_intermediate for lt in self.layers)
        return self.total_params - idle


def is_ffn_weight(name: str) -> bool:
    """Whether an (our-name) weight belongs to a routed/shared expert or a dense FFN (i.e. is tiled)."""
    return ".mlp." in name and name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight"))


def dtype_bytes(dtype: torch.dtype) -> int:
    """Element size of a torch dtype."""
    return torch.empty(0, dtype=dtype).element_size()
