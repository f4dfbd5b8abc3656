"""ModelConfig: the one place Hugging Face config names are translated into ours.

Each family module supplies a `config_from_hf(hf: dict) -> ModelConfig`; everything downstream
(layers, loader, topology, placement) reads only this frozen dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from tilemem.errors import ConfigError


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters (default, linear or yarn)."""

    theta: float = 10000.0
    """Base frequency."""
    kind: str = "default"
    """One of `default`, `linear`, `yarn`."""
    factor: float = 1.0
    """Context extension factor (linear, yarn)."""
    original_max_position: int = 0
    """Pre-extension context length (yarn)."""
    beta_fast: float = 32.0
    """YaRN high-frequency boundary, in rotations."""
    beta_slow: float = 1.0
    """YaRN low-frequency boundary, in rotations."""
    mscale: float = 0.0
    """YaRN magnitude scale of cos/sin (0: not given)."""
    mscale_all_dim: float = 0.0
    """YaRN magnitude scale also applied to the softmax scale (DeepSeek)."""
    interleave: bool = False
    """Rotate interleaved pairs (DeepSeek-V2; V3 `rope_interleave`) instead of halves."""
    fp32_rotate: bool = False
    """Rotate in fp32 and cast back (DeepSeek-V2's complex rotation); else in the model dtype."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one MoE causal LM, in TileMEM's vocabulary: what the model code is built from.

    Which shape is which: `ModelConfig` (this: every hyperparameter, from a Hugging Face config) ->
    `models.topology.Topology` (what planning needs: per-layer FFN widths and bytes) <- `sdk.ModelSpec` (a
    model described by hand for the SDK); `tmap.shape.PlanShape` is a plan reduced for the cost model."""

    family: str
    """Registry key of the model family, e.g. `olmoe`."""
    architecture: str
    """Hugging Face architecture name, e.g. `OlmoeForCausalLM`."""
    vocab_size: int
    """Rows of the embedding and LM head."""
    hidden_size: int
    """Residual stream width D."""
    num_layers: int
    """Decoder layers."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA when smaller than num_heads)."""
    head_dim: int
    """Per-head width of q/k/v (non-MLA attention)."""
    intermediate_size: int
    """Width of dense FFN layers."""
    moe_intermediate_size: int
    """Width I of one routed expert."""
    num_experts: int
    """Routed experts E per MoE layer."""
    top_k: int
    """Experts per token K."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope: RopeConfig = field(default_factory=RopeConfig)
    """Rotary embedding parameters."""
    max_position_embeddings: int = 4096
    """Longest context the model supports."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding matrix."""
    hidden_act: str = "silu"
    """FFN activation."""
    attention_bias: bool = False
    """q/k/v projections carry a bias."""
    o_bias: bool = False
    """Output projection carries a bias."""
    qk_norm: str = "none"
    """`none`, `full` (RMSNorm over all heads, OLMoE) or `head` (per head, Qwen3)."""
    clip_qkv: float | None = None
    """Clamp q/k/v to [-clip, clip] (OLMoE)."""
    norm_topk_prob: bool = False
    """Renormalize the top-k routing weights to sum to one."""
    scoring_func: str = "softmax"
    """Router score function: `softmax` or `sigmoid`."""
    topk_method: str = "greedy"
    """`greedy`, `group_limited_greedy` (DeepSeek-V2) or `noaux_tc` (DeepSeek-V3)."""
    n_group: int = 1
    """Expert groups for group-limited routing."""
    topk_group: int = 1
    """Groups a token may route to."""
    router_weights_in_model_dtype: bool = False
    """Round top-k weights to the model dtype before scaling expert outputs (OLMoE, Qwen)."""
    routed_scaling_factor: float = 1.0
    """Multiplier on routed expert weights."""
    router_bias: bool = False
    """Router carries `e_score_correction_bias` (DeepSeek-V3)."""
    router_fp32: bool = False
    """Router logits are computed in fp32 whatever the model dtype (DeepSeek); else in the model dtype."""
    num_shared_experts: int = 0
    """Shared experts fused into one FFN of width num_shared_experts * shared_intermediate_size."""
    shared_intermediate_size: int = 0
    """Width of one shared expert."""
    shared_expert_gate: bool = False
    """Shared expert output is scaled by sigmoid(gate(x)) (Qwen2-MoE)."""
    dense_layers: tuple[int, ...] = ()
    """Layers with a dense FFN instead of MoE."""
    # MLA (DeepSeek) attention; zero when absent.
    q_lora_rank: int = 0
    """Query low-rank width (0: direct q projection)."""
    kv_lora_rank: int = 0
    """Compressed KV width; > 0 selects MLA attention."""
    qk_nope_head_dim: int = 0
    """Per-head q/k width without rotary embedding (MLA)."""
    qk_rope_head_dim: int = 0
    """Per-head q/k width with rotary embedding (MLA)."""
    v_head_dim: int = 0
    """Per-head value width (MLA)."""
    # DeepSeek sparse attention (DSA, DeepSeek-V3.2 / GLM-5): a lightning indexer picks the keys.
    index_topk: int = 0
    """Keys each query may attend under DSA (`index_topk`); 0 selects dense attention."""
    index_n_heads: int = 0
    """Indexer query heads (`index_n_heads`)."""
    index_head_dim: int = 0
    """Indexer q/k width; its first qk_rope_head_dim dims carry rotary embeddings (`index_head_dim`)."""
    index_rope_interleave: bool = False
    """Indexer rotates interleaved pairs (GLM-MoE-DSA) instead of halves (DeepSeek-V3.2)."""
    index_shared_layers: tuple[int, ...] = ()
    """Layers that reuse the previous indexer's top-k instead of running their own (GLM `indexer_types`)."""
    # Multi-token prediction (DeepSeek-V3 style), loaded beside the main model as `model.mtp`.
    num_mtp_layers: int = 0
    """MTP layers after the last decoder layer (`num_nextn_predict_layers`); 0 if the checkpoint has none."""
    mtp_own_embed: bool = True
    """Each MTP layer stores its own `embed_tokens` (DeepSeek layout); else it uses the main embedding."""
    mtp_own_head: bool = True
    """Each MTP layer stores `shared_head.head`; else it uses the main LM head."""
    torch_dtype: str = "bfloat16"
    """Dtype the checkpoint is stored in (for an FP8 checkpoint: its unquantized weights and activations)."""
    weight_format: str = ""
    """`fp8_e4m3` where config.json declares FP8 block quantization (`quantization_config`), else empty: the
    weights are plain `torch_dtype`."""
    quant_block: tuple[int, int] = (0, 0)
    """FP8 `weight_block_size` (rows, columns of one scale block)."""
    quant_skip: tuple[str, ...] = ()
    """Modules kept in high precision (`modules_to_not_convert` / `ignored_layers`), hub names."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token."""
    eos_token_ids: tuple[int, ...] = ()
    """End-of-sequence tokens."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Family-specific settings that do not change the computation graph."""

    @property
    def is_mla(self) -> bool:
        """Whether attention is multi-head latent attention."""
        return self.kv_lora_rank > 0

    @property
    def is_dsa(self) -> bool:
        """Whether attention is DeepSeek sparse attention (MLA plus a top-k indexer)."""
        return self.is_mla and self.index_topk > 0

    def has_indexer(self, layer: int) -> bool:
        """Whether `layer` (an MTP layer too) runs its own DSA indexer."""
        return self.is_dsa and layer not in self.index_shared_layers

    def is_moe_layer(self, layer: int) -> bool:
        """Whether `layer` routes tokens to experts."""
        return self.num_experts > 0 and layer not in self.dense_layers

    def with_(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)


class HFConfig:
    """Read access to a Hugging Face config dict that names missing fields clearly.

    `aliases` is the family's transformers `attribute_map` (alias -> canonical name): config.json may
    hold either name (transformers 5 writes `num_local_experts` where older Qwen3-MoE configs say
    `num_experts`), so both are filled in from whichever is present; the caller's dict is not changed."""

    def __init__(
        self, data: dict[str, Any], source: str = "config.json", aliases: dict[str, str] | None = None
    ) -> None:
        self.aliases = dict(aliases or {})
        data = dict(data)
        for alias, canonical in self.aliases.items():
            for name, other in ((alias, canonical), (canonical, alias)):
                if data.get(name) is None and data.get(other) is not None:
                    data[name] = data[other]
        self.data = data
        self.source = source

    def _also(self, name: str) -> str:
        """` (or 'alias')` for a name with aliases, else empty."""
        others = [a for a, c in self.aliases.items() if c == name] + [c for a, c in self.aliases.items() if a == name]
        return "".join(f" (or '{o}')" for o in others)

    def req(self, *names: str) -> Any:
        """The first present key among `names`, or a ConfigError naming it."""
        for name in names:
            if self.data.get(name) is not None:
                return self.data[name]
        raise ConfigError(
            f"{self.source} has no field '{names[0]}'{self._also(names[0])}, which the "
            f"{self.data.get('architectures', ['?'])[0]} architecture needs; "
            "add it (see the model's original config.json on the hub)."
        )

    def get(self, name: str, default: Any = None) -> Any:
        """`name` if present and not null, else `default`."""
        value = self.data.get(name)
        return default if value is None else value

    def rope(self, interleave: bool = False) -> RopeConfig:
        """Rope parameters from either `rope_theta` + `rope_scaling` or v5 `rope_parameters`."""
        params = dict(self.data.get("rope_parameters") or {})
        scaling = dict(self.data.get("rope_scaling") or {})
        params = {**scaling, **params}
        theta = params.get("rope_theta", self.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        if kind not in ("default", "linear", "yarn"):
            raise ConfigError(f"{self.source}: rope type '{kind}' is not supported; supported: default, linear, yarn.")
        return RopeConfig(
            theta=float(theta),
            kind=kind,
            factor=float(params.get("factor", 1.0)),
            original_max_position=int(
                params.get("original_max_position_embeddings", self.get("max_position_embeddings", 4096))
            ),
            beta_fast=float(params.get("beta_fast", 32.0)),
            beta_slow=float(params.get("beta_slow", 1.0)),
            mscale=float(params.get("mscale") or 0.0),
            mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
            interleave=interleave,
        )

    def eos_ids(self) -> tuple[int, ...]:
        """`eos_token_id` as a tuple (it may be an int or a list)."""
        eos = self.data.get("eos_token_id")
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, list) else (int(eos),)

    def common(self) -> dict[str, Any]:
        """Fields that every family names the same way."""
        hidden = int(self.req("hidden_size"))
        heads = int(self.req("num_attention_heads"))
        return dict(
            architecture=self.req("architectures")[0],
            vocab_size=int(self.req("vocab_size")),
            hidden_size=hidden,
            num_layers=int(self.req("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(self.get("num_key_value_heads", heads)),
            head_dim=int(self.get("head_dim", hidden // heads)),
            rms_norm_eps=float(self.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(self.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(self.get("tie_word_embeddings", False)),
            hidden_act=str(self.get("hidden_act", "silu")),
            torch_dtype=str(self.get("torch_dtype", self.get("dtype", "bfloat16"))),
            bos_token_id=self.get("bos_token_id"),
            eos_token_ids=self.eos_ids(),
            num_mtp_layers=int(self.get("num_nextn_predict_layers", 0)),
            **self.quantization(),
        )

    def quantization(self) -> dict[str, Any]:
        """ModelConfig fields of `quantization_config` (none: a plain checkpoint). Only FP8 e4m3 with
        128x128 block scales runs; every other method is refused, naming it."""
        qc = self.data.get("quantization_config")
        if not qc:
            return {}
        if not isinstance(qc, dict):
            raise ConfigError(f"{self.source}: 'quantization_config' must be an object, got {qc!r}.")
        method = str(qc.get("quant_method", "?")).lower()
        supported = "fp8 (e4m3, 128x128 block scales, as DeepSeek-V3/V3.2, GLM-5 and Qwen3-FP8 publish)"
        if method != "fp8":
            raise ConfigError(
                f"{self.source}: quantization method '{method}' is not supported; TileMEM runs {supported}, "
                "and GGUF files. Use the model's bf16 or FP8 release."
            )
        fmt = str(qc.get("fmt", "e4m3")).lower()
        if fmt not in ("e4m3", "float8_e4m3fn"):
            raise ConfigError(f"{self.source}: FP8 format '{fmt}' is not supported; only e4m3 runs.")
        block = qc.get("weight_block_size")
        if block is None or list(block) != [128, 128]:
            raise ConfigError(
                f"{self.source}: FP8 weight_block_size {block} is not supported; TileMEM runs {supported} "
                "(per-tensor or per-channel FP8 scales are not)."
            )
        if str(qc.get("activation_scheme", "dynamic")) != "dynamic":
            raise ConfigError(
                f"{self.source}: FP8 activation_scheme '{qc['activation_scheme']}' is not supported; only "
                "'dynamic' (weights quantized, activations kept in the model dtype) runs."
            )
        scale_fmt = qc.get("scale_fmt")
        if scale_fmt not in (None, "ue8m0", "float32", "fp32"):
            raise ConfigError(f"{self.source}: FP8 scale_fmt '{scale_fmt}' is not supported; use ue8m0 or float32.")
        skip = list(qc.get("modules_to_not_convert") or []) + list(qc.get("ignored_layers") or [])
        return {"weight_format": "fp8_e4m3", "quant_block": (128, 128), "quant_skip": tuple(map(str, skip))}
