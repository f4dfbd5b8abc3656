"""GGUF models: our reader and writer, against the checkpoint they came from, transformers on the dequantized
weights, and llama.cpp itself (its converter, `llama-quantize` and its logits, where TILEMEM_LLAMACPP is set)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from llamacpp_tools import convert, llamacpp_dir, quantize
from safetensors.torch import save_file
from test_parity import check_fp32_parity, prompts, rel_err

from tilemem.errors import CheckpointError, ConfigError, UnsupportedArchitectureError, WeightError
from tilemem.layers import ggml
from tilemem.layers.kv_cache import ForwardContext
from tilemem.loader.checkpoint import Checkpoint, load_model
from tilemem.synth.gguf_writer import GGUF_TINY, synthesize_gguf, write_gguf
from tilemem.synth.writer import synthesize

FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]


def gguf_overrides(family: str) -> dict:
    """`tiny` as GGUF files have it (rows of 256 weights; no dense qwen2_moe layer, which llama.cpp lacks)."""
    fields = {**GGUF_TINY, "shared_expert_intermediate_size": 256}
    keep = {"hidden_size", "intermediate_size", "moe_intermediate_size"}
    if family == "qwen2_moe":
        keep |= {"shared_expert_intermediate_size"}
        return {**{k: v for k, v in fields.items() if k in keep}, "mlp_only_layers": []}
    return {k: v for k, v in fields.items() if k in keep}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """files(family, mix) -> a synthetic GGUF file written by our writer, cached."""
    cache: dict[tuple, Path] = {}

    def make(family: str, mix: str) -> Path:
        if (family, mix) not in cache:
            out = tmp_path_factory.mktemp(f"gguf-{family}") / f"{family}-{mix}.gguf"
            cache[(family, mix)] = synthesize_gguf(family, "tiny", out, mix, progress=False)
        return cache[(family, mix)]

    return make


def dequantized_reference(gguf_file: Path, out: Path) -> Path:
    """A Hugging Face checkpoint of the GGUF file's weights decoded to fp32 (the reference decoding), under the
    hub names, with the config its metadata implies: what transformers loads as the oracle."""
    ckpt = Checkpoint.open(gguf_file)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for ours, value in ckpt.tensors():
        t = value.dequantize() if isinstance(value, ggml.GgmlMatrix) else value.float()
        tensors[ckpt.family.to_hub(ours)] = t.contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    hf = {**ckpt.hf_config, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(hf))
    return out


def last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Prefill logits of every token: ids [1, T] -> [T, V]."""
    cache = model.allocate_cache(1, ids.shape[1] + 1)
    return model(ids, ForwardContext.build(cache, [0], [0], [ids.shape[1]]))[0]


@pytest.fixture
def exact(monkeypatch):
    """The native kernels' exact path (fp32 activations) instead of llama.cpp's 8-bit one."""
    monkeypatch.setattr(ggml, "FAST", False)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_f32_file_runs_as_the_checkpoint_it_was_written_from(family, tmp_path):
    """Names, stacked experts, llama's permuted q/k and MLA's split kv_b are undone exactly: the same weights, the
    same logits up to fp32 summation order (torch's kernels sum differently at another memory alignment)."""
    dense = {"mlp_only_layers": []} if family == "qwen2_moe" else None  # llama.cpp's qwen2moe has no dense layer
    ckpt = synthesize(family, "tiny", tmp_path / "hf", dtype="fp32", overrides=dense, progress=False)
    path = write_gguf(ckpt, tmp_path / "m.gguf", "f32", progress=False)
    a, _ = load_model(ckpt, "fp32")
    b, _ = load_model(path, "fp32")
    ids = torch.tensor([prompts(a.cfg.vocab_size)[0]])
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())
    assert rel_err(last_logits(a, ids), last_logits(b, ids)) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_q4_k_m_reference_path_matches_transformers(family, files, tmp_path, exact):
    """Acceptance 1: our exact path on a Q4_K_M file = transformers on its dequantized weights (fp32 tolerance),
    batched prefill, 32 decode steps and greedy tokens."""
    path = files(family, "q4_k_m")
    check_fp32_parity(path, ref=dequantized_reference(path, tmp_path / "ref"))


@pytest.mark.parametrize("mix", ["q8_0", "q4_0", "q5_k_m", "q6_k"])
def test_every_mix_matches_transformers(mix, files, tmp_path, exact):
    path = files("olmoe", mix)
    check_fp32_parity(path, ref=dequantized_reference(path, tmp_path / "ref"))


def test_the_file_holds_the_blocks_of_its_mix(files):
    """Q4_K_M: q4_k matrices, q6_k for the output and the bumped attn_v / ffn_down layers, f32 norms and router."""
    g = Checkpoint.open(files("olmoe", "q4_k_m")).file
    types = {name: t.type_name for name, t in g.tensors.items()}
    assert types["output.weight"] == "q6_k"
    assert types["blk.1.ffn_down_exps.weight"] == "q6_k"  # llama.cpp's use_more_bits(1, 2): the last eighth
    assert types["blk.0.ffn_down_exps.weight"] == "q4_k"
    assert types["blk.0.ffn_gate_exps.weight"] == "q4_k"
    assert types["blk.0.attn_norm.weight"] == "f32" and types["blk.0.ffn_gate_inp.weight"] == "f32"
    assert set(types.values()) <= {"q4_k", "q6_k", "f32"}


def test_torch_reference_equals_the_native_exact_path(files, monkeypatch, exact):
    """The kernels' exact path = the torch reference decoding (up to fp32 summation order)."""
    path = files("deepseek_v3", "q4_k_m")
    model, _ = load_model(path, "fp32")
    ids = torch.tensor([prompts(model.cfg.vocab_size)[1]])
    native = last_logits(model, ids)
    monkeypatch.setattr(ggml, "_native", lambda: None)
    reference = last_logits(model, ids)
    assert rel_err(native, reference) < 1e-5


FAST_MAX_REL = 2e-2
"""How far the fast path's logits may be from the exact ones (8-bit activations per block, as llama.cpp):
measured ~2e-3 on these files (README, "Run a GGUF model")."""


def forced_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits after `prompt` and after each of `tokens` fed in turn (prefill, then cached decode): [1 + n, V]."""
    cache = model.allocate_cache(1, len(prompt) + len(tokens) + 1)
    out = [model(torch.tensor([prompt]), ForwardContext.build(cache, [0], [0], [len(prompt)]))[0, -1]]
    for i, t in enumerate(tokens):
        out.append(model(torch.tensor([[t]]), ForwardContext.build(cache, [0], [len(prompt) + i], [1]))[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_fast_path_stays_within_its_bound_and_picks_the_same_tokens(family, files, monkeypatch):
    """Along the exact path's greedy continuation of each test prompt, the fast path's logits stay within
    FAST_MAX_REL, and pick the same token wherever the exact path's top-2 margin exceeds twice their distance
    (random tiny models have near-ties, where any other summation order may flip a token)."""
    path = files(family, "q4_k_m")
    model, _ = load_model(path, "fp32")
    decisive = 0
    for prompt in prompts(model.cfg.vocab_size, seed=3):
        monkeypatch.setattr(ggml, "FAST", False)
        tokens: list[int] = []
        for _ in range(12):  # the exact path's greedy tokens
            tokens.append(int(forced_logits(model, prompt, tokens)[-1].argmax()))
        exact_logits = forced_logits(model, prompt, tokens[:-1])  # [12, V]
        monkeypatch.setattr(ggml, "FAST", True)
        fast = forced_logits(model, prompt, tokens[:-1])
        assert 0 < rel_err(fast, exact_logits) < FAST_MAX_REL  # another computation, and a close one
        top2 = exact_logits.topk(2, dim=-1).values  # [12, 2]
        dist = (fast - exact_logits).abs().amax(-1)  # [12]
        clear = (top2[:, 0] - top2[:, 1]) > 2 * dist
        assert torch.equal(fast.argmax(-1)[clear], torch.tensor(tokens)[clear])
        decisive += int(clear.sum())
    assert decisive >= 12  # the check is not vacuous


def test_a_gguf_file_generates_text_with_its_own_tokenizer(files):
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams

    llm = LLM(str(files("qwen3_moe", "q8_0")), dtype="bf16")
    out = llm.generate(["def add(a, b):"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 6 and out.text
    assert "<|assistant|>" in llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


# ---- bad input ----------------------------------------------------------------------------------------------


def test_bad_files_get_errors_naming_the_file(files, tmp_path):
    good = files("olmoe", "q8_0").read_bytes()
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"GGML" + good[4:])
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        Checkpoint.open(wrong)
    old = tmp_path / "old.gguf"
    old.write_bytes(good[:4] + (1).to_bytes(4, "little") + good[8:])
    with pytest.raises(CheckpointError, match="version 1"):
        Checkpoint.open(old)
    for cut in (100, len(good) // 2, len(good) - 64):
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(good[:cut])
        with pytest.raises(CheckpointError, match="truncated|corrupt|cut short"):
            load_model(short, "fp32")
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "none.gguf")


def _rewrite(
    src: Path, dst: Path, arch: str | None = None, drop: str | None = None, keep=None, metadata: bool = True
) -> Path:
    """A copy of GGUF `src` written with the gguf package: another architecture name, a tensor left out (`drop`),
    only some tensors (`keep`), or no metadata but the architecture (a later part of a split set)."""
    import gguf

    r = gguf.GGUFReader(src)
    old_arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch or old_arch)
    for key, field in r.fields.items() if metadata else ():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = {"sub_type": field.types[-1]} if vtype == gguf.GGUFValueType.ARRAY else {}
        w.add_key_value(key.replace(old_arch + ".", (arch or old_arch) + ".", 1), field.contents(), vtype, **sub)
    for t in r.tensors:
        if t.name == drop or (keep is not None and t.name not in keep):
            continue
        data = np.asarray(t.data)
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_unknown_architecture_and_missing_tensor(files, tmp_path):
    src = files("olmoe", "q8_0")
    with pytest.raises(UnsupportedArchitectureError, match="architecture 'gpt2'.*olmoe"):
        Checkpoint.open(_rewrite(src, tmp_path / "a.gguf", arch="gpt2"))
    missing = _rewrite(src, tmp_path / "m.gguf", drop="blk.1.ffn_up_exps.weight")
    with pytest.raises(WeightError, match="missing tensors.*up_proj"):
        load_model(missing, "fp32")


def test_unsupported_tensor_type_names_the_tensor_and_the_types(files, tmp_path):
    """A type TileMEM does not compute (here IQ4_NL) is refused with the tensor, the file and what runs."""
    import gguf

    src = files("olmoe", "q8_0")
    r = gguf.GGUFReader(src)
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    raw = bytearray(src.read_bytes())
    # rewrite the tensor info's type field in place: name, n_dims, dims, then the u32 type
    name = t.name.encode()
    at = raw.find(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(raw[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(raw[type_at : type_at + 4], "little") == int(gguf.GGMLQuantizationType.Q8_0)
    raw[type_at : type_at + 4] = int(gguf.GGMLQuantizationType.IQ4_NL).to_bytes(4, "little")  # same 32-block size
    bad = tmp_path / "iq4.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_q\.weight.*IQ4_NL.*q4_k"):
        Checkpoint.open(bad)


def test_wrong_shape_is_refused(files, tmp_path):
    """A tensor of another shape than the metadata implies (here the embedding of a larger vocab)."""
    src = files("olmoe", "q8_0")
    g = Checkpoint.open(src)
    bigger = _rewrite(src, tmp_path / "v.gguf")
    raw = bytearray(bigger.read_bytes())
    name = b"output_norm.weight"
    at = raw.find(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    assert int.from_bytes(raw[at + 4 : at + 12], "little") == g.config.hidden_size
    raw[at + 4 : at + 12] = (g.config.hidden_size // 2).to_bytes(8, "little")
    bigger.write_bytes(bytes(raw))
    with pytest.raises(WeightError, match="output_norm.weight.*shape"):
        load_model(bigger, "fp32")


def test_split_sets(files, tmp_path):
    """The first part of a split set opens every part; a later part or a missing part is refused by name."""
    import gguf

    src = files("qwen3_moe", "q8_0")
    r = gguf.GGUFReader(src)
    stem = tmp_path / "m"
    # two parts as llama-gguf-split writes them: metadata in the first, tensors divided
    names = [t.name for t in r.tensors]
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        _rewrite(src, Path(f"{stem}-{i + 1:05d}-of-00002.gguf"), keep=set(part), metadata=i == 0)
    first = Path(f"{stem}-00001-of-00002.gguf")
    split, _ = load_model(first, "fp32")
    whole, _ = load_model(src, "fp32")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(last_logits(split, ids), last_logits(whole, ids))
    with pytest.raises(CheckpointError, match="part 2 of a split GGUF set.*00001-of-00002"):
        Checkpoint.open(f"{stem}-00002-of-00002.gguf")
    Path(f"{stem}-00002-of-00002.gguf").unlink()
    with pytest.raises(CheckpointError, match="00002-of-00002.gguf is missing"):
        Checkpoint.open(first)


def test_synth_refuses_bad_requests(tmp_path):
    with pytest.raises(ConfigError, match="ending in .gguf"):
        synthesize_gguf("olmoe", "tiny", tmp_path / "dir", "q8_0", progress=False)
    with pytest.raises(ConfigError, match="unknown GGUF quant 'q3_k'"):
        synthesize_gguf("olmoe", "tiny", tmp_path / "m.gguf", "q3_k", progress=False)
    with pytest.raises(ConfigError, match="no llama.cpp architecture"):
        synthesize_gguf("glm_moe_dsa", "tiny", tmp_path / "m.gguf", "q8_0", progress=False)
    assert not list(tmp_path.iterdir())  # nothing half-written


# ---- llama.cpp's own files and logits (TILEMEM_LLAMACPP) -----------------------------------------------------

LLAMA_LOGITS = """
import sys, numpy as np, llama_cpp
ids = [int(t) for t in sys.argv[3:]]
llm = llama_cpp.Llama(model_path=sys.argv[1], logits_all=True, n_ctx=64, n_threads=2, verbose=False)
llm.eval(ids)
np.save(sys.argv[2], np.array(llm.scores[: len(ids)], dtype=np.float32))
"""


def llamacpp_logits(gguf_file: Path, ids: list[int], tmp_path: Path) -> torch.Tensor:
    """llama.cpp's logits of every token of `ids` on `gguf_file` (its python binding, built with its tools)."""
    python = llamacpp_dir() / "venv" / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{python} (llama-cpp-python, made by build_llamacpp.sh) is missing")
    script, out = tmp_path / "llama_logits.py", tmp_path / "logits.npy"
    script.write_text(LLAMA_LOGITS)
    subprocess.run([str(python), str(script), str(gguf_file), str(out), *map(str, ids)], check=True, timeout=120)
    return torch.from_numpy(np.load(out))


LLAMACPP_MAX_REL = 2e-2
"""Our fast path vs llama.cpp on the same file (both 8-bit activations, other summation orders): measured
1-3e-3 on Q4_K_M files, 2e-6 on f32 ones."""


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen3_moe", "deepseek_v3"])
def test_our_files_run_in_llamacpp_with_our_logits(family, files, tmp_path):
    path = files(family, "q4_k_m")
    model, _ = load_model(path, "fp32")
    ids = prompts(model.cfg.vocab_size)[0]
    ours = last_logits(model, torch.tensor([ids]))
    theirs = llamacpp_logits(path, ids, tmp_path)
    assert rel_err(ours, theirs) < LLAMACPP_MAX_REL
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


LLAMACPP_CASES = [(f, "Q4_K_M") for f in FAMILIES] + [("olmoe", "Q8_0"), ("olmoe", "Q6_K"), ("deepseek_v3", "Q8_0")]


@pytest.mark.parametrize(("family", "qtype"), LLAMACPP_CASES)
def test_llamacpp_converted_and_quantized_files(family, qtype, tmp_path, exact):
    """Acceptance 1 on llama.cpp's files: converter (f32) then llama-quantize; our reference path = transformers on
    the dequantized weights; our fast path's logits near llama.cpp's own. DeepSeek-V2 with a q_lora_rank (as
    DeepSeek-V2 has): this llama.cpp loads one without (V2-Lite) only with 26 or 27 layers, by which it knows Lite."""
    fields = gguf_overrides(family) | ({"q_lora_rank": 64} if family == "deepseek_v2" else {})
    ckpt = synthesize(family, "tiny", tmp_path / "hf", dtype="bf16", overrides=fields, progress=False)
    f32 = convert(ckpt, tmp_path / "f32.gguf", "f32")
    path = quantize(f32, tmp_path / f"{qtype}.gguf", qtype)
    f32.unlink()
    kinds = {t.type_name for t in Checkpoint.open(path).file.tensors.values()}
    assert {"Q8_0": "q8_0", "Q4_K_M": "q4_k", "Q6_K": "q6_k"}[qtype] in kinds
    check_fp32_parity(path, ref=dequantized_reference(path, tmp_path / "ref"))
    model, _ = load_model(path, "fp32")
    ids = prompts(model.cfg.vocab_size)[1]
    ggml.FAST = True
    try:
        ours = last_logits(model, torch.tensor([ids]))
    finally:
        ggml.FAST = False
    theirs = llamacpp_logits(path, ids, tmp_path)
    assert rel_err(ours, theirs) < LLAMACPP_MAX_REL
