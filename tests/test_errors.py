"""Bad input gives an error that names what is wrong and how to fix it, never a bare traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tilemem.cli.main import main
from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams
from tilemem.errors import (
    CheckpointError,
    ConfigError,
    RequestError,
    UnsupportedArchitectureError,
    WeightError,
)
from tilemem.loader.checkpoint import Checkpoint, load_model

INDEX = "model.safetensors.index.json"


# -- helpers ------------------------------------------------------------------------------------------
def copy_ckpt(src: Path, tmp_path: Path, name: str = "broken") -> Path:
    """A private copy of a session checkpoint that a test may break."""
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


def shard_of(ckpt: Path, hub_name: str) -> Path:
    """The shard file that holds `hub_name`, per the index."""
    return ckpt / read_json(ckpt / INDEX)["weight_map"][hub_name]


def rewrite_shard(ckpt: Path, shard: Path, edit) -> None:
    """Load a shard, let `edit(tensors)` change the dict, write it back and update the index."""
    tensors = load_file(str(shard))
    before = set(tensors)
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = read_json(ckpt / INDEX)
    for name in before - set(tensors):
        del index["weight_map"][name]
    for name in set(tensors) - before:
        index["weight_map"][name] = shard.name
    write_json(ckpt / INDEX, index)


def the_shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("*.safetensors"))[0]


# -- config -------------------------------------------------------------------------------------------
def test_unsupported_architecture_lists_the_supported_ones(make_ckpt, tmp_path):
    ckpt = copy_ckpt(make_ckpt("olmoe"), tmp_path)
    cfg = read_json(ckpt / "config.json")
    cfg["architectures"] = ["FooForCausalLM"]
    write_json(ckpt / "config.json", cfg)
    with pytest.raises(UnsupportedArchitectureError) as err:
        Checkpoint.open(ckpt)
    msg = str(err.value)
    assert "FooForCausalLM" in msg
    for arch in ("OlmoeForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        assert arch in msg


def test_missing_architectures_field_says_what_to_add(make_ckpt, tmp_path):
    ckpt = copy_ckpt(make_ckpt("olmoe"), tmp_path)
    cfg = read_json(ckpt / "config.json")
    del cfg["architectures"]
    write_json(ckpt / "config.json", cfg)
    with pytest.raises(UnsupportedArchitectureError, match="architectures"):
        Checkpoint.open(ckpt)


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen2_moe"])
def test_missing_config_field_is_named(family, make_ckpt, tmp_path):
    ckpt = copy_ckpt(make_ckpt(family), tmp_path)
    cfg = read_json(ckpt / "config.json")
    del cfg["hidden_size"]
    write_json(ckpt / "config.json", cfg)
    with pytest.raises(ConfigError) as err:
        Checkpoint.open(ckpt)
    msg = str(err.value)
    assert "'hidden_size'" in msg
    assert "config.json" in msg
    assert "add it" in msg


def test_config_that_is_not_json(make_ckpt, tmp_path):
    ckpt = copy_ckpt(make_ckpt("olmoe"), tmp_path)
    (ckpt / "config.json").write_text('{"architectures": ["OlmoeForCausalLM"],')
    with pytest.raises(ConfigError, match="not valid JSON") as err:
        Checkpoint.open(ckpt)
    assert str(ckpt / "config.json") in str(err.value)


# -- weights ------------------------------------------------------------------------------------------
# Hub names (not ours) must appear in messages: Mixtral and Qwen2-MoE rename on load.
DROPPED = {
    "olmoe": "model.layers.1.mlp.experts.3.down_proj.weight",
    "mixtral": "model.layers.1.block_sparse_moe.experts.3.w2.weight",
    "qwen2_moe": "model.layers.2.mlp.shared_expert.up_proj.weight",
}


@pytest.mark.parametrize("family", sorted(DROPPED))
def test_missing_tensor_is_named_by_its_hub_name(family, make_ckpt, tmp_path):
    ckpt = copy_ckpt(make_ckpt(family), tmp_path)
    name = DROPPED[family]
    rewrite_shard(ckpt, shard_of(ckpt, name), lambda t: t.pop(name))
    with pytest.raises(WeightError) as err:
        load_model(ckpt, "fp32")
    msg = str(err.value)
    assert "missing" in msg
    assert f"{name}" in msg
    assert str(ckpt) in msg


def test_tensor_in_index_but_not_in_shard(make_ckpt, tmp_path):
    ckpt = copy_ckpt(make_ckpt("olmoe"), tmp_path)
    name = DROPPED["olmoe"]
    shard = shard_of(ckpt, name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard))  # the index still lists it
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(ckpt)
    assert name in str(err.value) and shard.name in str(err.value)


def test_unexpected_tensor_is_named(make_ckpt, tmp_path):
    ckpt = copy_ckpt(make_ckpt("mixtral"), tmp_path)
    extra = "model.layers.0.block_sparse_moe.experts.8.w1.weight"  # an expert the config lacks
    shard = the_shard(ckpt)
    rewrite_shard(ckpt, shard, lambda t: t.update({extra: torch.zeros(48, 64)}))
    with pytest.raises(WeightError) as err:
        load_model(ckpt, "fp32")
    msg = str(err.value)
    assert extra in msg
    assert "does not use" in msg


def test_unexpected_tensor_in_single_file_checkpoint(make_ckpt, tmp_path):
    """Without an index every tensor of every *.safetensors file counts."""
    ckpt = copy_ckpt(make_ckpt("olmoe"), tmp_path)
    (ckpt / INDEX).unlink()
    shard = the_shard(ckpt)
    tensors = load_file(str(shard))
    tensors["model.layers.0.mlp.bogus.weight"] = torch.zeros(3)
    shard.unlink()
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(WeightError, match=r"model\.layers\.0\.mlp\.bogus\.weight"):
        load_model(ckpt, "fp32")


def test_single_file_checkpoint_without_index_loads(make_ckpt, tmp_path):
    """The control for the test above: the same layout without the extra tensor is fine."""
    ckpt = copy_ckpt(make_ckpt("olmoe"), tmp_path)
    (ckpt / INDEX).unlink()
    shard = the_shard(ckpt)
    shard.rename(ckpt / "model.safetensors")
    model, _ = load_model(ckpt, "fp32")
    ref, _ = load_model(make_ckpt("olmoe"), "fp32")
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_misshaped_tensor_names_it_and_both_shapes(make_ckpt, tmp_path):
    ckpt = copy_ckpt(make_ckpt("qwen2_moe"), tmp_path)
    name = "model.layers.0.mlp.experts.5.gate_proj.weight"  # [moe_intermediate 32, hidden 64]
    rewrite_shard(ckpt, shard_of(ckpt, name), lambda t: t.update({name: torch.zeros(33, 64)}))
    with pytest.raises(WeightError) as err:
        load_model(ckpt, "fp32")
    msg = str(err.value)
    assert name in msg
    assert "[33, 64]" in msg
    assert "[32, 64]" in msg


# -- files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", ["4 bytes", "header only", "half", "all but one byte"])
def test_truncated_safetensors_file(keep, make_ckpt, tmp_path):
    ckpt = copy_ckpt(make_ckpt("olmoe"), tmp_path)
    shard = the_shard(ckpt)
    data = shard.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    cut = {"4 bytes": 4, "header only": header_end, "half": len(data) // 2, "all but one byte": len(data) - 1}
    shard.write_bytes(data[: cut[keep]])
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(ckpt)
    msg = str(err.value)
    assert "truncated" in msg
    assert str(shard) in msg
    assert "re-download" in msg or "re-run" in msg


@pytest.mark.parametrize("garbage", [b"garbage!#$%^", b"\xff\xfe\x00\x01" * 3, b"[1, 2]      "])
def test_corrupt_safetensors_header(garbage, make_ckpt, tmp_path):
    ckpt = copy_ckpt(make_ckpt("olmoe"), tmp_path)
    shard = the_shard(ckpt)
    data = bytearray(shard.read_bytes())
    data[8:20] = garbage
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(ckpt)
    msg = str(err.value)
    assert "corrupt" in msg
    assert str(shard) in msg


def test_safetensors_header_that_is_not_an_object(make_ckpt, tmp_path):
    ckpt = copy_ckpt(make_ckpt("olmoe"), tmp_path)
    shard = the_shard(ckpt)
    data = bytearray(shard.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 : 8 + header_len] = b"[1, 2]".ljust(header_len)  # valid JSON, wrong type
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as err:
        Checkpoint.open(ckpt)
    assert str(shard) in str(err.value)


def test_index_lists_a_missing_shard(make_ckpt, tmp_path):
    ckpt = copy_ckpt(make_ckpt("olmoe"), tmp_path)
    shard = the_shard(ckpt)
    shard.unlink()
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(ckpt)
    msg = str(err.value)
    assert shard.name in msg
    assert "missing" in msg
    assert "re-download" in msg


def test_path_that_does_not_exist(tmp_path):
    path = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="does not exist") as err:
        Checkpoint.open(path)
    assert str(path) in str(err.value)


def test_file_instead_of_directory(make_ckpt):
    path = make_ckpt("olmoe") / "config.json"
    with pytest.raises(CheckpointError, match="not a checkpoint directory") as err:
        Checkpoint.open(path)
    assert str(path) in str(err.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json") as err:
        Checkpoint.open(tmp_path)
    assert "tilemem synth" in str(err.value)


def test_directory_with_config_but_no_weights(make_ckpt, tmp_path):
    ckpt = tmp_path / "weightless"
    ckpt.mkdir()
    shutil.copy(make_ckpt("olmoe") / "config.json", ckpt / "config.json")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors") as err:
        Checkpoint.open(ckpt)
    assert str(ckpt) in str(err.value)


# -- requests -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(make_ckpt):
    return LLM(make_ckpt("olmoe"), dtype="fp32")


@pytest.mark.parametrize("prompt", ["", [[]], ["x", ""]])
def test_empty_prompt(llm, prompt):
    with pytest.raises(RequestError, match="empty"):
        llm.generate(prompt, SamplingParams(max_tokens=2))


def test_no_prompts_gives_no_outputs(llm):
    assert llm.generate([], SamplingParams(max_tokens=2)) == []


@pytest.mark.parametrize("bad", [512, 10_000, -1])
def test_token_id_outside_vocabulary(llm, bad):
    with pytest.raises(RequestError) as err:
        llm.generate([5, bad, 7], SamplingParams(max_tokens=2))
    msg = str(err.value)
    assert str(bad) in msg
    assert "0..511" in msg


def test_prompt_longer_than_context(llm):
    n = llm.max_model_len + 5
    with pytest.raises(RequestError) as err:
        llm.generate([7] * n, SamplingParams(max_tokens=2))
    msg = str(err.value)
    assert str(n) in msg and str(llm.max_model_len) in msg
    assert "shorten" in msg


def test_bad_request_leaves_the_engine_usable(llm):
    """A rejected prompt in a batch must not leave the good ones queued in the engine."""
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    with pytest.raises(RequestError):
        llm.generate([[5, 6], [5, 999_999]], params)
    alone = llm.generate([5, 6], params)[0]
    assert len(alone.token_ids) == 3
    assert not llm._engine.has_work()


def test_params_list_must_match_prompts(llm):
    with pytest.raises(RequestError, match="2 prompts"):
        llm.generate([[5, 6], [7, 8]], [SamplingParams(max_tokens=2)])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_k=-2), "top_k"),
        (dict(logprobs=-1), "logprobs"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(RequestError) as err:
        SamplingParams(**kwargs)
    msg = str(err.value)
    assert field in msg
    assert str(next(iter(kwargs.values()))) in msg or field == "stop"


def test_more_logprobs_than_vocabulary_are_capped(llm):
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=2, temperature=0, logprobs=10_000))[0]
    assert [len(top) for top in out.top_logprobs] == [llm.config.vocab_size] * 2


def test_unknown_device_is_named(make_ckpt):
    with pytest.raises(ConfigError, match="unknown device 'tpu'; use 'cpu' or 'cuda'"):
        LLM(make_ckpt("olmoe"), dtype="fp32", device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_says_so(make_ckpt):
    with pytest.raises(ConfigError, match="needs a CUDA GPU and this machine has none"):
        LLM(make_ckpt("olmoe"), dtype="fp32", device="cuda")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):  # a plan that gives the GPU a budget
        LLM(make_ckpt("olmoe"), dtype="fp32", budget="cuda=64MiB,cpu=64MiB")


def test_string_prompt_without_tokenizer(make_ckpt, tmp_path):
    ckpt = copy_ckpt(make_ckpt("olmoe"), tmp_path)
    (ckpt / "tokenizer.json").unlink()
    llm = LLM(ckpt, dtype="fp32")
    with pytest.raises(RequestError, match="token ids"):
        llm.generate("hello", SamplingParams(max_tokens=2))


def test_chat_without_template(make_ckpt, tmp_path):
    ckpt = copy_ckpt(make_ckpt("olmoe"), tmp_path)
    tok_cfg = read_json(ckpt / "tokenizer_config.json")
    del tok_cfg["chat_template"]
    write_json(ckpt / "tokenizer_config.json", tok_cfg)
    llm = LLM(ckpt, dtype="fp32")
    with pytest.raises(RequestError, match="chat_template"):
        llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2))


# -- CLI ----------------------------------------------------------------------------------------------
def break_header(ckpt: Path) -> Path:
    shard = the_shard(ckpt)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"garbage!#$%^"
    shard.write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize("command", ["inspect", "generate"])
@pytest.mark.parametrize("damage", ["corrupt header", "no such path", "unsupported architecture"])
def test_cli_reports_bad_checkpoint_without_traceback(command, damage, make_ckpt, tmp_path, capsys):
    ckpt = copy_ckpt(make_ckpt("olmoe"), tmp_path)
    if damage == "corrupt header":
        expect = str(break_header(ckpt))
    elif damage == "no such path":
        ckpt = tmp_path / "missing"
        expect = str(ckpt)
    else:
        cfg = read_json(ckpt / "config.json")
        cfg["architectures"] = ["FooForCausalLM"]
        write_json(ckpt / "config.json", cfg)
        expect = "OlmoeForCausalLM"
    argv = [command, str(ckpt)] + (["--max-tokens", "2"] if command == "generate" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert expect in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_reports_bad_request_without_traceback(make_ckpt, capsys):
    code = main(["generate", str(make_ckpt("olmoe")), "--prompt", "hi", "--max-tokens", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "max_tokens" in err
    assert "Traceback" not in err


def test_cli_reports_bad_device_without_traceback(make_ckpt, capsys):
    code = main(["generate", str(make_ckpt("olmoe")), "--prompt", "hi", "--device", "tpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "unknown device 'tpu'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["synth", "nosuchfamily"], "known families"),
        (["synth", "mixtral", "--preset", "small"], "olmoe family only"),
        (["synth", "olmoe", "--preset", "huge"], "presets:"),
        (["synth", "olmoe", "--dtype", "int3"], "bf16, fp16, fp32"),
    ],
)
def test_cli_synth_rejects_bad_arguments(argv, expect, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err
    assert not out.exists()
    assert not out.with_name("out.partial").exists()
