"""Speculative decoding: greedy output identical to plain decoding, and rejection sampling keeps the
target distribution."""

from __future__ import annotations

import pytest
import torch

from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams, token_probs
from tilemem.models.topology import Topology
from tilemem.speculative.drafters import Draft, NgramDrafter
from tilemem.speculative.verify import verify

PROMPTS = ["Hello world, hello world, hello", "def f(x):\n    return x", "a b a b a b a", "The quick brown"]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def disk_budget(path) -> str:
    llm_cfg = LLM(path, dtype="fp32").config
    topo = Topology.from_config(llm_cfg, "float32")
    return f"cpu={topo.non_expert_bytes + topo.shared_and_dense_bytes + topo.routed_expert_bytes // 3}B"


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("tiered", [False, True])
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_speculative_equals_plain(method, tiered, batch, make_ckpt, tmp_path):
    path = make_ckpt("olmoe", "fp32")
    prompts = PROMPTS[:batch]
    plain = LLM(path, dtype="fp32").generate(prompts, GREEDY)
    kw = dict(budget=disk_budget(path), policy="tilepo_fine", tile=16, store=tmp_path / "store") if tiered else {}
    spec = "ngram" if method == "ngram" else f"draft:{path}"
    llm = LLM(path, dtype="fp32", speculative=spec, num_draft=3, **kw)
    out = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    stats = llm.speculator.stats
    assert stats.accepted and max(stats.accepted) <= 4
    if method == "draft":  # the target drafting for itself is always right
        assert min(stats.accepted) == 4 or sum(stats.accepted) / len(stats.accepted) > 3
    if tiered:
        assert llm.stats().runtime["disk_bytes"] > 0  # the budget really forced disk reads
    assert "Accepted length: mean=" in stats.line()


def test_ngram_drafter_copies_what_followed_the_suffix():
    from tilemem.engine.sampling import make_generator
    from tilemem.engine.sequence import Sequence

    seq = Sequence([1, 2, 3, 4, 9, 1, 2, 3], GREEDY, make_generator(0))
    assert NgramDrafter().propose(seq, 3).tokens == [4, 9, 1]
    assert NgramDrafter().propose(Sequence([5, 6, 7], GREEDY, make_generator(0)), 3).tokens == []


@pytest.mark.parametrize("deterministic_draft", [True, False])
def test_rejection_sampling_keeps_target_distribution(deterministic_draft, make_ckpt):
    """The first token verify() emits is distributed as the target's p, whatever the draft proposes."""
    llm = LLM(make_ckpt("olmoe", "fp32"), dtype="fp32")
    params = SamplingParams(max_tokens=1, temperature=1.0, top_k=8)  # 8 live tokens: a testable support
    with torch.no_grad():
        from tilemem.layers.kv_cache import ForwardContext

        cache = llm.model.allocate_cache(1, 16)
        ids = torch.tensor([[5, 17, 33, 2]])
        logits = llm.model(ids, ForwardContext.build(cache, [0], [0], [4]))[0]  # [4, V]
    p = token_probs(logits[0], params)
    q = token_probs(logits[1], params)  # a different distribution as the draft's
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros_like(p)
    trials = 6000
    for _ in range(trials):
        if deterministic_draft:
            draft = Draft([int(torch.argmax(q))])
        else:
            draft = Draft([int(torch.multinomial(q, 1, generator=gen))], [q])
        n, nxt = verify(logits[:2], draft, params, gen)
        first = draft.tokens[0] if n >= 1 else nxt
        counts[first] += 1
    emp = counts / trials
    tv = 0.5 * float((emp - p).abs().sum())
    assert tv < 0.03, f"total variation {tv:.3f} between speculative and target first-token distributions"


def test_generator_and_convert_alias(make_ckpt, tmp_path, capsys):
    from tilemem.convert import main as convert_main
    from tilemem.errors import ConfigError
    from tilemem.generators import ShowHandsGenerator

    path = make_ckpt("olmoe", "fp32")
    assert convert_main(["--model_type", "olmoe", "--model_dir", str(path), "--save_dir", str(tmp_path / "s")]) == 0
    assert convert_main(["--model_type", "glm-5", "--model_dir", str(path), "--save_dir", str(tmp_path / "t")]) == 2
    assert "expects a glm_moe_dsa checkpoint" in capsys.readouterr().err
    gen = ShowHandsGenerator(max_new_tokens=8, model_weights_dir=tmp_path / "s", dtype="fp32").from_pretrained()
    text = gen.generate("Hello")
    ref = LLM(path, dtype="fp32").generate("Hello", SamplingParams(max_tokens=8, temperature=0))[0].text
    assert text == ref
    with pytest.raises(ConfigError, match="no MTP layers"):
        ShowHandsGenerator(model_weights_dir=path, with_mtp=True).from_pretrained()


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("tiered", [False, True])
def test_greedy_mtp_speculative_equals_plain(batch, tiered, tmp_path):
    from tilemem.synth.writer import synthesize

    path = synthesize("deepseek_v3", "tiny", tmp_path / "ck", dtype="fp32", mtp=True, progress=False)
    prompts = PROMPTS[:batch]
    plain = LLM(path, dtype="fp32").generate(prompts, GREEDY)
    kw = dict(budget=disk_budget(path), policy="tilepo_fine", tile=16, store=tmp_path / "store") if tiered else {}
    llm = LLM(path, dtype="fp32", speculative="mtp", num_draft=2, **kw)
    assert llm.model.mtp is not None
    out = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert llm.speculator.stats.accepted
    if tiered:
        assert llm.stats().runtime["disk_bytes"] > 0
