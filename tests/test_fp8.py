"""FP8 checkpoints (e4m3 weights, 128x128 block scales) as published: parity with transformers, bytes kept
as FP8, and bad input refused by name."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_parity import check_bf16_greedy, check_fp32_parity, hf_model, rel_err

from tilemem.errors import ConfigError, WeightError
from tilemem.layers.fp8 import FP8
from tilemem.layers.linear import Linear
from tilemem.loader.checkpoint import load_model
from tilemem.models.registry import families
from tilemem.synth.writer import synthesize

FAMILIES = sorted(families())


def dequantized_copy(path, out):
    """The FP8 checkpoint at `path` written as fp32, every block dequantized here, independently of TileMEM:
    W[i, j] = float(fp8[i, j]) * scale_inv[i // 128, j // 128], the last blocks cropped."""
    out.mkdir()
    for f in path.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    for f in path.glob("*.safetensors"):
        tensors = load_file(f)
        plain = {}
        for name, t in tensors.items():
            if name.endswith("_scale_inv"):
                continue
            if t.dtype == FP8:
                scale = tensors[name.removesuffix(".weight") + ".weight_scale_inv"].float()
                w = t.float()
                for bi in range(scale.shape[0]):
                    for bj in range(scale.shape[1]):
                        w[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128] *= scale[bi, bj]
                t = w
            plain[name] = t.float().contiguous()
        save_file(plain, out / f.name, metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg))
    index = path / "model.safetensors.index.json"
    if index.exists():
        idx = json.loads(index.read_text())
        idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if not k.endswith("_scale_inv")}
        (out / index.name).write_text(json.dumps(idx))
    return out


@pytest.fixture(scope="module")
def fp8_ckpt(make_ckpt, tmp_path_factory):
    """fp8_ckpt(family, scale_fmt) -> (FP8 checkpoint, its fp32 dequantized copy)."""
    cache = {}

    def make(family: str, scale_fmt: str = "float32", **kw):
        key = (family, scale_fmt, tuple(sorted(kw.items())))
        if key not in cache:
            path = make_ckpt(family, "fp8", routing_skew=1.0, scale_fmt=scale_fmt, **kw)
            cache[key] = path, dequantized_copy(path, tmp_path_factory.mktemp("deq") / "ckpt")
        return cache[key]

    return make


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_fp32_parity_with_dequantized_transformers(family, fp8_ckpt):
    """fp32 activations on FP8 weights: transformers' logits on the dequantized weights, prefill and 32 decode
    steps, and its greedy tokens (odd shapes: partial blocks in every matrix)."""
    path, ref = fp8_ckpt(family)
    check_fp32_parity(path, ref=ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_bf16_greedy_agrees_with_transformers(family, fp8_ckpt):
    path, ref = fp8_ckpt(family)
    check_bf16_greedy(path, ref=ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_ue8m0_scales(family, fp8_ckpt):
    path, ref = fp8_ckpt(family, "ue8m0")
    scales = [t for f in path.glob("*.safetensors") for n, t in load_file(f).items() if n.endswith("_scale_inv")]
    assert scales and all(t.dtype == torch.float8_e8m0fnu for t in scales)
    check_fp32_parity(path, ref=ref)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fp8_matches_transformers_own_fp8_path(family, tmp_path):
    """Where transformers' FP8 dequantization is right (every dimension a multiple of 128 or at most one
    block: it derives the block size from the scale grid, so a cropped last block comes out wrong), its own
    FP8 path is the oracle."""
    widths = {"hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 128}
    if family == "deepseek_v3":
        # every dimension a multiple of 128 or a single block: kv_a's 96 + 32 = 128 rows, heads 4 x 64 ...
        widths.update(q_lora_rank=128, kv_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32)
    path = synthesize(
        family, "tiny", tmp_path / "ckpt", dtype="fp8", routing_skew=1.0, overrides=widths, progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=transformers.FineGrainedFP8Config(dequantize=True)
        ).eval()
    model, _ = load_model(path, "fp32")
    ids = torch.randint(5, model.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    from tilemem.layers.kv_cache import ForwardContext

    ctx = ForwardContext.build(model.allocate_cache(1, 16), [0], [0], [12])
    with torch.no_grad():
        assert rel_err(model(ids, ctx)[0], hf(ids).logits[0]) < 1e-4


def test_fp8_weights_stay_fp8(fp8_ckpt):
    """One byte per quantized weight in memory, mapped from the file (no copy), scales beside them."""
    path, _ = fp8_ckpt("deepseek_v3")
    model, ckpt = load_model(path, "bf16")
    assert ckpt.config.weight_format == "fp8_e4m3"
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    fp8 = {n for n, m in linears.items() if m.weight.dtype == FP8}
    assert {"lm_head"} & fp8 == set()
    assert "model.layers.1.mlp.experts.0.gate_proj" in fp8 and "model.layers.0.self_attn.kv_b_proj" in fp8
    for n in fp8:
        w, s = linears[n].weight, linears[n].weight_scale_inv
        assert w.element_size() == 1 and s.dtype == torch.float32
        assert tuple(s.shape) == (math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128))


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_fp8_models_bf16_lm_head_is_stored_as_x12(family, fp8_ckpt):
    """An FP8 checkpoint's bf16 LM head goes to x12 as a bf16 model's does (where the AVX512 kernels run):
    12 bits a weight, the same greedy tokens and log-probabilities as kept bf16 (`weight_codec="none"`); the FP8
    weights stay FP8."""
    from tilemem import kernels
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams

    if not kernels.available():
        pytest.skip("x12 needs the AVX512-BF16 kernels")
    path, _ = fp8_ckpt(family)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
    prompts = ["The capital of France", "x " * 20]
    plain = LLM(path, dtype="bf16", weight_codec="none")
    packed = LLM(path, dtype="bf16")  # weight_codec="x12"
    assert plain.model.lm_head.x12 is None and packed.model.lm_head.x12 is not None
    assert packed.model.lm_head.x12.nbytes < 0.8 * packed.model.lm_head.weight.numel() * 2
    assert packed.model.model.layers[1].mlp.experts[0].gate_proj.weight.dtype == FP8
    want, got = plain.generate(prompts, params), packed.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.logprobs for o in got] == [o.logprobs for o in want]


def test_fp8_dequantize_at_load_says_so(fp8_ckpt, caplog):
    path, ref = fp8_ckpt("qwen3_moe")
    with caplog.at_level("WARNING"):
        model, _ = load_model(path, "fp32", dequantize=True)
    assert "dequantizing" in caplog.text
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, Linear))
    ref_model = hf_model(ref, torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    from tilemem.layers.kv_cache import ForwardContext

    ctx = ForwardContext.build(model.allocate_cache(1, 8), [0], [0], [4])
    with torch.no_grad():
        assert rel_err(model(ids, ctx)[0], ref_model(ids).logits[0]) < 1e-4


def _rewrite(path, tmp_path, edit_tensors=None, edit_config=None):
    out = tmp_path / "bad"
    shutil.copytree(path, out)
    if edit_config:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        for f in out.glob("*.safetensors"):
            tensors = load_file(f)
            edit_tensors(tensors)
            save_file(tensors, f, metadata={"format": "pt"})
        idx = out / "model.safetensors.index.json"
        if idx.exists():
            idx.unlink()
    return out


SCALE = "model.layers.0.mlp.experts.1.up_proj.weight_scale_inv"


def test_fp8_weight_without_scale_is_named(fp8_ckpt, tmp_path):
    path, _ = fp8_ckpt("olmoe")
    bad = _rewrite(path, tmp_path, edit_tensors=lambda t: t.pop(SCALE))
    with pytest.raises(WeightError, match=r"experts\.1\.up_proj\.weight' .* has no .*weight_scale_inv"):
        load_model(bad)


def test_fp8_scale_of_wrong_shape_is_named(fp8_ckpt, tmp_path):
    path, _ = fp8_ckpt("olmoe")

    def edit(t):
        t[SCALE] = torch.ones(4, 4)

    bad = _rewrite(path, tmp_path, edit_tensors=edit)
    with pytest.raises(WeightError, match=r"experts\.1\.up_proj\.weight_scale_inv' .* shape \[4, 4\].* needs \[3, 2\]"):
        load_model(bad)


def test_fp8_other_block_size_is_refused(fp8_ckpt, tmp_path):
    path, _ = fp8_ckpt("olmoe")
    bad = _rewrite(path, tmp_path, edit_config=lambda c: c["quantization_config"].update(weight_block_size=[64, 64]))
    with pytest.raises(ConfigError, match=r"weight_block_size \[64, 64\] is not supported"):
        load_model(bad)


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors", "bitsandbytes", "mxfp4"])
def test_other_quantization_methods_are_refused_by_name(fp8_ckpt, tmp_path, method):
    path, _ = fp8_ckpt("olmoe")
    bad = _rewrite(path, tmp_path, edit_config=lambda c: c.update(quantization_config={"quant_method": method}))
    with pytest.raises(ConfigError, match=f"quantization method '{method}' is not supported; TileMEM runs fp8"):
        load_model(bad)


def test_fp8_tensor_without_quantization_config_is_refused(fp8_ckpt, tmp_path):
    path, _ = fp8_ckpt("olmoe")
    bad = _rewrite(path, tmp_path, edit_config=lambda c: c.pop("quantization_config"))
    with pytest.raises(WeightError, match="float8_e4m3fn, but config.json declares no FP8 quantization_config"):
        load_model(bad)


def test_native_fp8_path_matches_the_reference_path(fp8_ckpt, monkeypatch):
    """The whole model through the native FP8 kernels (where they run: linears, and each MoE layer's experts in
    one fused call) and through the reference path (torch dequantizes blocks, fp32 GEMMs): the same logits to
    1e-5 (only the summation order differs)."""
    from tilemem.kernels import fp8 as native
    from tilemem.layers import fp8 as fp8_layer
    from tilemem.layers.kv_cache import ForwardContext

    if not native.available():
        pytest.skip("the native FP8 kernels need AVX2 + FMA and a C compiler")
    path, _ = fp8_ckpt("deepseek_v3")
    model, _ = load_model(path, "fp32")
    ids = torch.randint(5, model.cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))

    def logits():
        ctx = ForwardContext.build(model.allocate_cache(2, 8), [0, 1], [0, 0], [7, 7])
        with torch.no_grad():
            return model(ids, ctx)

    fast = logits()
    monkeypatch.setattr(native, "available", lambda: False)  # linears and the experts' fused FFN alike
    assert fp8_layer._native() is None
    assert rel_err(fast, logits()) < 1e-5


def test_inspect_and_convert_take_fp8_checkpoints(fp8_ckpt, tmp_path, capsys):
    """`tilemem inspect` names the format and counts FP8 bytes per expert; the TileRT-style converter takes
    an FP8 DeepSeek-V3.2 checkpoint and writes FP8 tiles."""
    from tilemem.cli.main import main
    from tilemem.convert import main as convert_main
    from tilemem.runtime.tile_store import TileStore

    path, _ = fp8_ckpt("deepseek_v32")
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    cfg = load_model(path)[1].config
    d, i = cfg.hidden_size, cfg.moe_intermediate_size
    per_expert = 3 * (d * i + 4 * math.ceil(d / 128) * math.ceil(i / 128))  # one byte a weight, fp32 scales
    assert "fp8_e4m3: FP8 weights with 128x128 block scales" in text and f"({per_expert:,} B)" in text
    args = ["--model_type", "deepseek-v32", "--model_dir", str(path), "--save_dir", str(tmp_path / "store")]
    assert convert_main(args) == 0
    assert TileStore(tmp_path / "store").codec.fp8


@pytest.mark.parametrize("extra", [[], ["--dequantize"], ["--budget", "cpu=1MiB,disk=1GiB", "--policy", "kt_expert"]])
def test_generate_cli_runs_fp8_checkpoints(fp8_ckpt, capsys, tmp_path, extra):
    """`tilemem generate` on an FP8 checkpoint: FP8 weights, dequantized ones, or a tiered plan (FP8 tiles on
    disk) print the greedy text of the resident FP8 engine."""
    from tilemem.cli.main import main
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams

    path, _ = fp8_ckpt("qwen3_moe")
    want = LLM(path, dtype="fp32").generate("hi", SamplingParams(max_tokens=6, temperature=0))[0]
    argv = ["generate", str(path), "--prompt", "hi", "--max-tokens", "6", "--temperature", "0", "--dtype", "fp32"]
    if extra[:1] == ["--budget"]:
        extra = [*extra, "--store", str(tmp_path / "store")]
    assert main(argv + extra) == 0
    assert capsys.readouterr().out == "hi" + want.text + "\n"


def test_plans_count_fp8_bytes_whatever_the_activation_dtype(fp8_ckpt):
    """`--dtype` on an FP8 checkpoint is the activations' dtype: plans and the fit check count the weights as
    stored (FP8 + scales), unless `--dequantize` makes them `dtype`."""
    from tilemem.engine.args import EngineArgs
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.models.topology import Topology

    path, _ = fp8_ckpt("olmoe")
    cfg = Checkpoint.open(path).config
    assert EngineArgs(path, dtype="fp32").weights_dtype(cfg) is None
    assert EngineArgs(path, dtype="fp32", dequantize=True).weights_dtype(cfg) == "fp32"
    fp8, fp32 = Topology.from_config(cfg), Topology.from_config(cfg, "fp32")
    assert fp8.dtype == "fp8_e4m3" and 3.9 < fp32.routed_expert_bytes / fp8.routed_expert_bytes < 4
