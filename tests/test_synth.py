"""Synthetic checkpoints: hub layout that transformers loads, a working tokenizer, the published
parameter counts of the real-shape presets, routing skew that really skews, and atomic writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tilemem.synth.writer as writer
from tilemem.config import HFConfig
from tilemem.engine.tokenizer import TextTokenizer
from tilemem.errors import ConfigError
from tilemem.layers.kv_cache import ForwardContext
from tilemem.loader.checkpoint import load_model
from tilemem.models.registry import family_by_name
from tilemem.models.topology import Topology
from tilemem.synth.presets import resolve_preset
from tilemem.synth.tokenizer import EOS, SPECIAL_TOKENS
from tilemem.synth.writer import synthesize

INDEX = "model.safetensors.index.json"


def shard_contents(path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """{shard file: {tensor name: shape}} read from the files themselves."""
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out[shard.name] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return out


# -- hub layout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "hub_names"),
    [
        (
            "mixtral",
            [
                "model.layers.0.block_sparse_moe.experts.0.w1.weight",
                "model.layers.1.block_sparse_moe.experts.7.w2.weight",
                "model.layers.1.block_sparse_moe.experts.3.w3.weight",
                "model.layers.0.block_sparse_moe.gate.weight",
            ],
        ),
        (
            "qwen2_moe",
            [
                "model.layers.0.mlp.experts.0.gate_proj.weight",
                "model.layers.0.mlp.shared_expert.down_proj.weight",
                "model.layers.0.mlp.shared_expert_gate.weight",
                "model.layers.1.mlp.gate_proj.weight",  # mlp_only_layers=[1]: dense
            ],
        ),
    ],
)
def test_sharded_checkpoint_loads_in_transformers(family, hub_names, tmp_path):
    transformers = pytest.importorskip("transformers")
    shard_bytes = 100_000
    path = synthesize(family, "tiny", tmp_path / "ckpt", dtype="fp32", shard_bytes=shard_bytes, progress=False)
    contents = shard_contents(path)
    assert len(contents) >= 3
    n = len(contents)
    assert sorted(contents) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

    index = json.loads((path / INDEX).read_text())
    expected_map = {name: shard for shard, names in contents.items() for name in names}
    assert index["weight_map"] == expected_map
    sizes = {s: sum(math.prod(shape) * 4 for shape in names.values()) for s, names in contents.items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    for shard, names in contents.items():  # shards respect the size limit unless one tensor exceeds it
        assert sizes[shard] <= shard_bytes or len(names) == 1
    for name in hub_names:
        assert name in expected_map

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # Loaded, not freshly initialized: transformers computes what we compute from the same files.
    ids = [5, 77, 300, 12, 9, 401]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    model, _ = load_model(path, "fp32")
    cache = model.allocate_cache(1, len(ids))
    ours = model(torch.tensor([ids]), ForwardContext.build(cache, [0], [0], [len(ids)]))[0]
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-4


def test_synth_is_deterministic_per_seed(tmp_path):
    def shard_bytes(seed: int, name: str) -> list[bytes]:
        path = synthesize("olmoe", "tiny", tmp_path / name, seed=seed, dtype="fp32", progress=False)
        return [p.read_bytes() for p in sorted(path.glob("*.safetensors"))]

    assert shard_bytes(1, "a") == shard_bytes(1, "b")
    assert shard_bytes(1, "a") != shard_bytes(2, "c")


# -- tokenizer ----------------------------------------------------------------------------------------
TEXTS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Return a new list containing all items from the iterable in ascending order.",
    "tabs\tand  double  spaces,\r\nwindows newlines and trailing space ",
    "naïve café — Grüße, 数字, emoji 🙂 and a zero-width\u200bjoiner",
]


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_tokenizer_round_trips_and_fits_the_vocabulary(family, make_ckpt):
    path = make_ckpt(family)
    cfg = json.loads((path / "config.json").read_text())
    tok = TextTokenizer(path)
    assert tok.tok.get_vocab_size() == cfg["vocab_size"]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids and all(0 <= i < cfg["vocab_size"] for i in ids)
        assert tok.decode(ids) == text
    for special in SPECIAL_TOKENS:
        assert len(tok.encode(special)) == 1
    eos = tok.tok.token_to_id(EOS)
    assert cfg["eos_token_id"] == eos == tok.eos_id
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == eos


def test_transformers_reads_the_same_tokenizer(make_ckpt):
    transformers = pytest.importorskip("transformers")
    path = make_ckpt("olmoe")
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    tok = TextTokenizer(path)
    for text in TEXTS:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.eos_token == EOS


def test_too_small_vocabulary_is_refused(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(ConfigError, match="vocab_size 200"):
        synthesize("olmoe", "tiny", out, dtype="fp32", progress=False, overrides={"vocab_size": 200})
    assert not out.exists() and not out.with_name("ckpt.partial").exists()


# -- real-shape presets -------------------------------------------------------------------------------
# Published totals and active-per-token counts, in billions. DeepSeek counts activated parameters
# without the input embedding (a lookup touches one row); the other vendors count it, as Topology does.
PUBLISHED = {
    "olmoe-1b-7b": (6.92, 1.28, False),
    "mixtral-8x7b": (46.7, 12.9, False),
    "qwen3-30b-a3b": (30.5, 3.35, False),
    "deepseek-v2-lite": (15.7, 2.4, True),
}


def preset_topology(preset: str) -> Topology:
    """Topology of a real-shape preset from its config alone, without writing weights."""
    family, fields = resolve_preset(None, preset)
    hf = writer.hf_config(family, fields, torch.bfloat16, eos_id=0)
    return Topology.from_config(family_by_name(family).config_from_hf(HFConfig(hf)))


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_real_shape_presets_have_the_published_parameter_counts(preset):
    total, active, without_embedding = PUBLISHED[preset]
    topo = preset_topology(preset)
    embedding = dict(topo.non_expert)["model.embed_tokens.weight"] // topo.dtype_bytes
    got_total = topo.total_params / 1e9
    got_active = (topo.active_params - (embedding if without_embedding else 0)) / 1e9
    print(f"{preset}: total {got_total:.3f}B active {got_active:.3f}B")
    assert math.isclose(got_total, total, rel_tol=0.005), got_total
    assert math.isclose(got_active, active, rel_tol=0.025 if without_embedding else 0.01), got_active
    assert topo.total_bytes == 2 * topo.total_params  # bf16, no fp32 buffers in these families


# -- routing skew -------------------------------------------------------------------------------------
SKEWS = (0.0, 0.5, 1.0, 2.0)
SKEW_OVERRIDES = {"num_experts": 16, "num_experts_per_tok": 2}


def top_quarter_share(path: Path, tokens: int = 320) -> float:
    """Mean over MoE layers of the share of routing choices that go to the busiest quarter of experts."""
    model, _ = load_model(path, "fp32")
    counts: dict[int, torch.Tensor] = {}

    def record(layer: int, ids: torch.Tensor) -> None:  # ids [T, K]
        counts[layer] = torch.bincount(ids.reshape(-1), minlength=model.cfg.num_experts)

    for block in model.moe_blocks().values():
        block.on_route = record
    ids = torch.randint(0, model.cfg.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    cache = model.allocate_cache(1, tokens)
    model(ids.unsqueeze(0), ForwardContext.build(cache, [0], [0], [tokens]))
    quarter = model.cfg.num_experts // 4
    assert len(counts) == len(model.moe_blocks())
    shares = [float(c.sort(descending=True).values[:quarter].sum() / c.sum()) for c in counts.values()]
    return sum(shares) / len(shares)


def test_routing_skew_concentrates_routing(tmp_path):
    shares = {}
    for skew in SKEWS:
        out = tmp_path / f"skew-{skew}"
        path = synthesize(
            "olmoe", "tiny", out, routing_skew=skew, dtype="fp32", progress=False, overrides=SKEW_OVERRIDES
        )
        shares[skew] = top_quarter_share(path)
    print("top-quarter routing share by skew:", {k: round(v, 3) for k, v in shares.items()})
    uniform = 0.25
    assert shares[0.0] < uniform + 0.15  # balanced up to sampling noise
    assert shares[0.0] < shares[0.5] < shares[1.0] < shares[2.0]  # the knob skews monotonically
    assert shares[2.0] > shares[0.0] + 0.2


# -- atomic writes ------------------------------------------------------------------------------------
def interrupt_after_first_shard(monkeypatch) -> None:
    calls = []
    real = writer.save_file

    def save_then_interrupt(*args, **kwargs):
        calls.append(args)
        if len(calls) > 1:
            raise KeyboardInterrupt
        real(*args, **kwargs)

    monkeypatch.setattr(writer, "save_file", save_then_interrupt)


def test_interrupted_synth_leaves_no_output(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    interrupt_after_first_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        synthesize("olmoe", "tiny", out, dtype="fp32", shard_bytes=100_000, progress=False)
    assert not out.exists()
    assert not out.with_name("ckpt.partial").exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_resynth_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = synthesize("olmoe", "tiny", tmp_path / "ckpt", seed=1, dtype="fp32", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    interrupt_after_first_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        synthesize("olmoe", "tiny", out, seed=2, dtype="fp32", shard_bytes=100_000, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    load_model(out, "fp32")
