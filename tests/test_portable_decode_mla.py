"""DeepSeek layers in the portable one-call decode step (`kernels.portable_decode`, `csrc_portable/mla_decode.c`):
multi-head latent attention (q_proj or the q LoRA, the latent cache, absorbed decode, interleaved rope in fp32), fp32
router logits with softmax greedy routing and routed scaling, shared experts without a gate, in bf16, FP8 and GGUF
Q4_K_M; the dense first layer and group-limited or sigmoid routing stay modules. The same greedy tokens, logits (bit
for bit on AVX2 torch builds) and routed ids as the modules, one native call a step for the MoE layers."""

from __future__ import annotations

import pytest
from test_portable_decode_layer import AVX512_BF16, compare, pytestmark  # noqa: F401  (the same skip)

from tilemem.loader.checkpoint import load_model
from tilemem.synth.gguf_writer import synthesize_gguf
from tilemem.synth.writer import synthesize

GREEDY = {"topk_method": "greedy"}  # tiny deepseek_v2 routes group-limited: that stays modules


def moe_runs(model) -> list[int]:
    """The MoE layers after the dense first one, as one run; asserting the dispatch takes exactly those."""
    layers = model._native_decode().layers
    assert [lay is not None for lay in layers] == [False] + [True] * (len(layers) - 1)
    assert all(lay.struct.mla and lay.struct.router_fp32 for lay in layers[1:])
    return [len(layers) - 1]


@pytest.mark.parametrize(
    "dtype,overrides",
    [
        pytest.param("bf16", GREEDY, marks=AVX512_BF16),
        ("fp8", GREEDY),
        pytest.param("bf16", {**GREEDY, "q_lora_rank": 24}, marks=AVX512_BF16),  # q_a / q_b with its norm
    ],
)
def test_mla_layers_decode_as_the_modules(tmp_path, monkeypatch, dtype, overrides):
    path = synthesize("deepseek_v2", "tiny", tmp_path / "ckpt", dtype=dtype, routing_skew=1.0, overrides=overrides,
                      progress=False)  # fmt: skip
    model, _ = load_model(path, "bf16")
    assert model.model.layers[1].mlp.shared_experts is not None and model.rope.interleave
    assert compare(model, monkeypatch, runs=moe_runs(model)) == 16


def test_mla_gguf_q4_k_m_decodes_as_the_modules(tmp_path, monkeypatch):
    path = synthesize_gguf(
        "deepseek_v2", "tiny", tmp_path / "dsv2.gguf", "q4_k_m", routing_skew=1.0, progress=False,
        overrides={**GREEDY, "n_group": 1, "topk_group": 1},  # the file's expert groups decide the routing
    )  # fmt: skip
    model, _ = load_model(path, "bf16")
    assert model.model.layers[1].self_attn.kv_a_proj_with_mqa.qtype is not None
    assert compare(model, monkeypatch, rows=3, runs=moe_runs(model)) == 16
