"""Numeric parity with Hugging Face transformers on tiny checkpoints of every family."""

from __future__ import annotations

import pytest
import torch
import transformers

from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams
from tilemem.layers.kv_cache import ForwardContext
from tilemem.loader.checkpoint import load_model
from tilemem.models.registry import families

FAMILIES = sorted(families())
PROMPT_LENS = [11, 7, 4]
DECODE_STEPS = 32


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.float().cpu(), ref.float().cpu()
    return float((ours - ref).abs().max() / ref.abs().max())


def hf_model(path, dtype, device="cpu"):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def hf_greedy(hf, prompt: list[int], steps: int):
    """HF greedy continuation: (tokens, per-step logits [steps, V], prefill logits [T, V])."""
    ids = torch.tensor([prompt], device=hf.device)
    # No end-of-sequence token: greedy runs all `steps`, as ours with ignore_eos (min_new_tokens would
    # instead forbid the EOS token, and take the runner-up where the argmax is EOS).
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        prefill = hf(ids).logits[0]
        out = hf.generate(
            ids, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    return tokens, torch.stack([lg[0] for lg in out.logits]), prefill


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_prefill_and_decode_match_transformers(family, make_ckpt):
    check_fp32_parity(make_ckpt(family, "fp32", routing_skew=1.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_greedy_agrees_with_transformers(family, make_ckpt):
    check_bf16_greedy(make_ckpt(family, "bf16", routing_skew=1.0))


def check_fp32_parity(path, device: str = "cpu", ref=None) -> None:
    """Our fp32 logits equal transformers' (both on `device`) for a batched prefill of unequal
    lengths and 32 cached decode steps, and greedy generation gives transformers' 32 tokens.
    Transformers loads `ref` where given (the same weights written another way), else `path`."""
    hf = hf_model(ref or path, torch.float32, device)
    model, _ = load_model(path, "fp32", device=device)
    batch = prompts(model.cfg.vocab_size)
    refs = [hf_greedy(hf, p, DECODE_STEPS) for p in batch]

    # Batched prefill of unequal lengths (right-padded), then teacher-forced decode of HF's tokens.
    cache = model.allocate_cache(len(batch), max(PROMPT_LENS) + DECODE_STEPS + 1)
    ids = torch.zeros(len(batch), max(PROMPT_LENS), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, : len(p)] = torch.tensor(p)
    ctx = ForwardContext.build(cache, list(range(len(batch))), [0] * len(batch), PROMPT_LENS)
    logits = model(ids, ctx)
    for i, (_, _, prefill) in enumerate(refs):
        assert rel_err(logits[i, : PROMPT_LENS[i]], prefill) < 1e-4
    # The engine's pass: logits at each row's last token only (the last layer runs that token alone).
    fresh = model.allocate_cache(len(batch), max(PROMPT_LENS) + 1)
    ctx_last = ForwardContext.build(fresh, list(range(len(batch))), [0] * len(batch), PROMPT_LENS)
    last = model(ids, ctx_last, logits_at=torch.tensor(PROMPT_LENS) - 1)  # [B, V]
    for i, (_, _, prefill) in enumerate(refs):
        assert rel_err(last[i], prefill[PROMPT_LENS[i] - 1]) < 1e-4
    for step in range(DECODE_STEPS):
        if step == 0:
            step_logits = torch.stack([logits[i, n - 1] for i, n in enumerate(PROMPT_LENS)])
        else:
            feed = torch.tensor([[r[0][step - 1]] for r in refs])
            starts = [n + step - 1 for n in PROMPT_LENS]
            ctx = ForwardContext.build(cache, list(range(len(batch))), starts, [1] * len(batch))
            step_logits = model(feed, ctx)[:, 0]
        for i, (_, ref_steps, _) in enumerate(refs):
            assert rel_err(step_logits[i], ref_steps[step]) < 1e-4, f"row {i} step {step}"

    # End to end: our greedy generation gives HF's 32 tokens for every prompt of the batch.
    llm = LLM(path, dtype="fp32", device=device)
    outs = llm.generate(batch, SamplingParams(max_tokens=DECODE_STEPS, temperature=0, ignore_eos=True))
    for out, (tokens, _, _) in zip(outs, refs, strict=True):
        assert out.token_ids == tokens


def check_bf16_greedy(path, device: str = "cpu", ref=None) -> None:
    """In bf16, our greedy tokens equal transformers' (both on `device`) for 16 steps (transformers
    loading `ref` where given, else `path`)."""
    hf = hf_model(ref or path, torch.bfloat16, device)
    llm = LLM(path, dtype="bf16", device=device)
    batch = prompts(llm.config.vocab_size, seed=1)
    outs = llm.generate(batch, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    for p, out in zip(batch, outs, strict=True):
        tokens, _, _ = hf_greedy(hf, p, 16)
        assert out.token_ids == tokens
