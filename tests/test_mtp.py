"""Multi-token-prediction heads: synthesized with `synth --mtp`, loaded as `model.mtp`, checked errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tilemem.errors import WeightError
from tilemem.layers.kv_cache import ForwardContext
from tilemem.loader.checkpoint import load_model
from tilemem.synth.writer import synthesize

PROMPT = [7, 42, 99, 13, 250, 8, 77, 301, 5, 64]


def run_mtp(model, prompt: list[int]):
    """Main prefill, then the MTP head over the same positions: (main logits, MTP logits, drafts)."""
    cache = model.allocate_cache(1, 64)
    ids = torch.tensor([prompt])
    ctx = ForwardContext.build(cache, [0], [0], [len(prompt)])
    logits, hidden = model(ids, ctx, return_hidden=True)  # [1, T, V], [1, T, D]
    sampled = int(logits[0, -1].argmax())
    next_ids = torch.tensor([prompt[1:] + [sampled]])  # the token after each position
    mtp_logits, h = model.mtp(hidden, next_ids, ctx)  # [1, T, V], [1, T, D]
    drafts = model.mtp.draft(hidden, next_ids, ctx, k=3)  # [1, 3]
    return logits, mtp_logits, h, drafts


def edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint, apply edit(tensors: dict) to its tensors, and rewrite the index."""
    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(dst / shard))
        edit(tensors)
        save_file(tensors, str(dst / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v32", "glm_moe_dsa"])
def test_synth_mtp_loads_a_working_head(family, make_ckpt):
    path = make_ckpt(family, "fp32", mtp=True)
    n = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    names = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    for own in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"):
        assert f"model.layers.{n}.{own}.weight" in names
    assert f"model.layers.{n}.mlp.experts.0.gate_proj.weight" in names  # a full decoder block

    model, ckpt = load_model(path, "fp32")
    assert model.mtp is not None and len(model.mtp.layers) == 1
    assert model.mtp.layers[0].shared_head.head is not None and model.mtp.layers[0].embed_tokens is not None
    assert len(model.allocate_cache(1, 8).keys) == n + 1  # the MTP block's own KV cache rows

    logits, mtp_logits, h, drafts = run_mtp(model, PROMPT)
    v, d = model.cfg.vocab_size, model.cfg.hidden_size
    assert mtp_logits.shape == (1, len(PROMPT), v) and mtp_logits.dtype == torch.float32
    assert h.shape == (1, len(PROMPT), d)
    assert torch.isfinite(mtp_logits).all()
    assert not torch.equal(mtp_logits, logits)  # its own head, not the main model's logits
    assert drafts.shape == (1, 3) and int(drafts[0, 0]) == int(mtp_logits[0, -1].argmax())

    again = run_mtp(model, PROMPT)  # fresh cache, same inputs: same outputs
    assert torch.equal(again[1], mtp_logits) and torch.equal(again[3], drafts)


def test_mtp_weights_leave_the_main_model_unchanged(make_ckpt):
    plain, _ = load_model(make_ckpt("deepseek_v32", "fp32"), "fp32")
    with_mtp, _ = load_model(make_ckpt("deepseek_v32", "fp32", mtp=True), "fp32")
    ids = torch.tensor([PROMPT])
    outs = [m(ids, ForwardContext.build(m.allocate_cache(1, 16), [0], [0], [len(PROMPT)])) for m in (plain, with_mtp)]
    assert torch.equal(outs[0], outs[1])  # same seed, same main weights; MTP tensors are written last


def test_checkpoint_without_mtp_has_none(make_ckpt, tmp_path):
    model, _ = load_model(make_ckpt("deepseek_v32", "fp32"), "fp32")
    assert model.mtp is None
    assert len(model.allocate_cache(1, 8).keys) == model.cfg.num_layers
    # The config declares an MTP layer but the checkpoint lacks its weights: no head, no error.
    overrides = {"num_nextn_predict_layers": 1}
    path = synthesize("deepseek_v32", "tiny", tmp_path / "declared", dtype="fp32", overrides=overrides, progress=False)
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    model, ckpt = load_model(path, "fp32")
    assert model.mtp is None and ckpt.config.num_mtp_layers == 0


def test_mtp_without_own_embedding_and_head_shares_the_main_ones(make_ckpt, tmp_path):
    src = make_ckpt("deepseek_v3", "fp32", mtp=True)
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]

    def drop(tensors):
        tensors.pop(f"model.layers.{n}.embed_tokens.weight", None)
        tensors.pop(f"model.layers.{n}.shared_head.head.weight", None)

    model, _ = load_model(edit_checkpoint(src, tmp_path / "shared", drop), "fp32")
    layer = model.mtp.layers[0]
    assert layer.embed_tokens is None and layer.shared_head.head is None
    _, mtp_logits, _, _ = run_mtp(model, PROMPT)
    assert mtp_logits.shape == (1, len(PROMPT), model.cfg.vocab_size)


def test_misshaped_or_misnamed_mtp_tensor_is_named(make_ckpt, tmp_path):
    src = make_ckpt("deepseek_v3", "fp32", mtp=True)
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    name = f"model.layers.{n}.eh_proj.weight"

    def misshape(tensors):
        tensors[name] = tensors[name][:, :-1].contiguous()

    def rename(tensors):
        tensors[f"model.layers.{n}.eh_projection.weight"] = tensors.pop(name)

    def remove(tensors):
        tensors.pop(f"model.layers.{n}.enorm.weight")

    with pytest.raises(WeightError, match=rf"MTP tensor '{name}'.*has shape \[64, 127\], expected \[64, 128\]"):
        load_model(edit_checkpoint(src, tmp_path / "misshaped", misshape), "fp32")
    with pytest.raises(WeightError, match=rf"MTP tensor 'model.layers.{n}.eh_projection.weight'.*not a tensor"):
        load_model(edit_checkpoint(src, tmp_path / "misnamed", rename), "fp32")
    with pytest.raises(WeightError, match=rf"missing tensors: model.layers.{n}.enorm.weight"):
        load_model(edit_checkpoint(src, tmp_path / "missing", remove), "fp32")
