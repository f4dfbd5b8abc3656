"""Generation behaviour of the LLM facade on tiny fp32 checkpoints: batching, sampling, stopping,
streaming, logprobs, chat templates and generation_config.json defaults."""

from __future__ import annotations

import json
import shutil

import psutil
import pytest
import torch

from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams
from tilemem.errors import ConfigError
from tilemem.layers.kv_cache import ForwardContext

# Different lengths, strings and token-id lists mixed.
PROMPTS = [
    "def fibonacci(n):\n    ",
    [17, 300, 45],
    "Hello world, this is a longer prompt of English text.",
    list(range(40, 71)),
]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm_for(make_ckpt):
    cache: dict[tuple, LLM] = {}

    def get(family: str, **kw) -> LLM:
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = LLM(make_ckpt(family), dtype="fp32", **kw)
        return cache[key]

    return get


@pytest.fixture
def llm(llm_for) -> LLM:
    return llm_for("olmoe")


def greedy(llm: LLM, prompt, max_tokens: int = 24):
    return llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]


def clean_substring(text: str, length: int, start: int = 4) -> str:
    """A substring of `text` past `start` with no replacement characters or whitespace."""
    for i in range(start, len(text) - length + 1):
        piece = text[i : i + length]
        if "\ufffd" not in piece and not any(c.isspace() for c in piece):
            return piece
    raise AssertionError(f"no clean substring of length {length} in {text!r}")


def copy_with(src, tmp_path, name: str, **files: dict):
    """A copy of checkpoint `src` with some JSON files replaced."""
    dst = tmp_path / name
    shutil.copytree(src, dst)
    for fname, data in files.items():
        (dst / f"{fname}.json").write_text(json.dumps(data))
    return dst


# -- batch invariance ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_greedy_output_is_the_same_alone_and_in_a_batch(family, llm_for):
    llm = llm_for(family)
    alone = [llm.generate(p, GREEDY)[0] for p in PROMPTS]
    assert len({tuple(o.token_ids) for o in alone}) == len(PROMPTS)  # the prompts really differ
    batched = llm.generate(PROMPTS, GREEDY)
    waves = llm_for(family, max_batch=2).generate(PROMPTS, GREEDY)  # 4 prompts through 2 slots
    for a, b, w in zip(alone, batched, waves, strict=True):
        assert len(a.token_ids) == 24 and a.finish_reason == "length"
        assert b.token_ids == a.token_ids
        assert w.token_ids == a.token_ids
        assert b.text == a.text == w.text
        assert b.prompt_token_ids == a.prompt_token_ids


def test_prefill_chunk_caps_the_prompt_tokens_of_a_pass_and_keeps_the_output(llm_for):
    """Prompts cut into passes of at most `prefill_chunk` tokens (later passes attend to the cached part
    of the prompt) give the tokens of whole-prompt passes."""
    whole = llm_for("olmoe").generate(PROMPTS, GREEDY)
    llm = llm_for("olmoe", prefill_chunk=5)
    chunked = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]
    passes = [s["prefill_tokens"] for s in llm.stats().steps if s["prefill_tokens"]]
    assert max(passes) == 5 and sum(passes) == sum(len(o.prompt_token_ids) for o in whole)
    with pytest.raises(ConfigError, match="prefill_chunk must be at least 1 token"):
        LLM(llm.path, prefill_chunk=0)


def test_requests_of_different_lengths_share_the_scheduler(llm_for):
    """Rows finish at different steps and new ones join mid-decode; each still gets its own prefix."""
    llm = llm_for("olmoe", max_batch=3)
    prompt = PROMPTS[0]
    full = greedy(llm, prompt)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in range(1, 25, 2)]
    outs = llm.generate([prompt] * len(params), params)
    for sp, out in zip(params, outs, strict=True):
        assert out.token_ids == full.token_ids[: sp.max_tokens]
        assert out.finish_reason == "length"


def test_text_is_the_decoded_tokens_even_mid_character(llm):
    """Output text equals decoding its tokens, also when the last token ends inside a character."""
    for prompt in ["class Foo:", *PROMPTS, "import os"]:
        full = greedy(llm, prompt)
        decoded = [llm.tokenizer.decode(full.token_ids[:n]) for n in range(1, 25)]
        if any(d.endswith("\ufffd") for d in decoded):
            break
    else:
        raise AssertionError("no greedy output ends inside a character; pick other prompts")
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in range(1, 25)]
    outs = llm.generate([prompt] * 24, params)
    assert [o.text for o in outs] == decoded


# -- sampling -----------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_seeds_differ(llm):
    def sampled(seed: int, prompts=PROMPTS[:1]):
        sp = SamplingParams(max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True)
        return [o.token_ids for o in llm.generate(prompts, sp)]

    first = sampled(7)
    assert sampled(7) == first
    assert sampled(8) != first
    assert first[0] != greedy(llm, PROMPTS[0]).token_ids
    # A request's seed fixes its tokens whatever else is in the batch.
    assert sampled(7, PROMPTS)[0] == first[0]


def test_top_k_one_is_greedy(llm):
    for prompt in PROMPTS[:2]:
        sp = SamplingParams(max_tokens=24, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
        assert llm.generate(prompt, sp)[0].token_ids == greedy(llm, prompt).token_ids


def test_tiny_top_p_is_greedy(llm):
    sp = SamplingParams(max_tokens=24, temperature=1.5, top_p=1e-6, seed=3, ignore_eos=True)
    assert llm.generate(PROMPTS[1], sp)[0].token_ids == greedy(llm, PROMPTS[1]).token_ids


# -- stopping -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 3])
@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[2]])
def test_stop_string_ends_generation_and_is_not_included(prompt, length, llm):
    full = greedy(llm, prompt)
    stop = clean_substring(full.text, length)
    cut = full.text.find(stop)
    out = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=stop))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert stop not in out.text
    assert len(out.token_ids) < 24
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    # The stop completed with the last token, not earlier.
    assert stop in llm.tokenizer.decode(out.token_ids)
    assert stop not in llm.tokenizer.decode(out.token_ids[:-1])


def test_earliest_of_several_stop_strings_wins(llm):
    full = greedy(llm, PROMPTS[2])
    early, late = clean_substring(full.text, 2, start=3), clean_substring(full.text, 2, start=12)
    cut = min(full.text.find(early), full.text.find(late))
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(late, early))
    out = llm.generate(PROMPTS[2], sp)[0]
    assert out.text == full.text[:cut]


@pytest.mark.parametrize("max_tokens", [1, 5, 24])
def test_max_tokens_gives_length(max_tokens, llm):
    for out in llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)):
        assert out.finish_reason == "length"
        assert len(out.token_ids) == max_tokens


def test_stop_token_id_ends_generation_at_it(llm):
    full = greedy(llm, PROMPTS[0])
    stop_id = full.token_ids[2]
    end = full.token_ids.index(stop_id) + 1
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=(stop_id,))
    out = llm.generate(PROMPTS[0], sp)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[:end]


def test_eos_from_generation_config_ends_generation(llm, make_ckpt, tmp_path):
    full = greedy(llm, PROMPTS[2])
    eos = full.token_ids[2]
    end = full.token_ids.index(eos)
    path = copy_with(make_ckpt("olmoe"), tmp_path, "eos", generation_config={"eos_token_id": [eos]})
    other = LLM(path, dtype="fp32")
    assert eos in other.eos_ids
    out = other.generate(PROMPTS[2], SamplingParams(max_tokens=24, temperature=0))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: end + 1]  # the eos token is returned ...
    assert out.text == llm.tokenizer.decode(full.token_ids[:end])  # ... but not its text
    ignored = other.generate(PROMPTS[2], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert ignored.token_ids == full.token_ids


# -- streaming ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop", [None, 2])
def test_stream_deltas_concatenate_to_the_generated_text(stop, llm):
    for prompt in PROMPTS:
        params = GREEDY
        if stop:
            params = SamplingParams(
                max_tokens=24, temperature=0, ignore_eos=True, stop=clean_substring(greedy(llm, prompt).text, stop)
            )
        want = llm.generate(prompt, params)[0].text
        deltas = list(llm.stream(prompt, params))
        assert all(deltas)
        assert "".join(deltas) == want


def test_interleaved_streams_keep_their_own_text(llm):
    want = [o.text for o in llm.generate(PROMPTS[:2], GREEDY)]
    llm.engine()  # one engine batches both streams
    streams = [llm.stream(p, GREEDY) for p in PROMPTS[:2]]
    got = ["", ""]
    live = [True, True]
    while any(live):
        for i, s in enumerate(streams):
            if live[i]:
                try:
                    got[i] += next(s)
                except StopIteration:
                    live[i] = False
    assert got == want


def test_abandoned_stream_frees_its_slot(llm):
    stream = llm.stream(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert next(stream)
    stream.close()
    eng = llm._engine
    assert not eng.has_work()
    assert len(eng.scheduler.free_slots) == eng.max_batch
    assert eng.pool.used == 0  # its KV blocks went back to the pool
    assert llm.generate(PROMPTS[1], GREEDY)[0].token_ids == greedy(llm, PROMPTS[1]).token_ids


# -- logprobs -----------------------------------------------------------------------------------------
def test_logprobs_match_a_teacher_forced_forward_pass(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3))[0]
    assert len(out.logprobs) == len(out.top_logprobs) == 8
    for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True):
        assert lp <= 0
        assert len(top) == 3 and all(v <= 0 for v in top.values())
        assert tok in top and top[tok] == max(top.values()) == lp  # greedy picks the top one
    # Independent check: one forward pass over prompt + output gives the same log-probabilities.
    ids = out.prompt_token_ids + out.token_ids
    cache = llm.model.allocate_cache(1, len(ids))
    logits = llm.model(torch.tensor([ids]), ForwardContext.build(cache, [0], [0], [len(ids)]))[0]
    ref = torch.log_softmax(logits, dim=-1)  # [T, V]
    n = len(out.prompt_token_ids)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert abs(float(ref[n - 1 + i, tok]) - lp) < 1e-4


def test_no_logprobs_unless_asked(llm):
    out = greedy(llm, PROMPTS[1], 4)
    assert out.logprobs == [] and out.top_logprobs == []
    only = llm.generate(PROMPTS[1], SamplingParams(max_tokens=4, temperature=0, logprobs=0))[0]
    assert len(only.logprobs) == 4 and only.top_logprobs == []


def test_sampled_token_logprob_is_reported(llm):
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=1, ignore_eos=True, logprobs=2)
    out = llm.generate(PROMPTS[1], sp)[0]
    assert len(out.logprobs) == 12
    for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True):
        assert lp <= max(top.values()) <= 0
        if tok in top:
            assert top[tok] == lp


# -- chat and generation_config -----------------------------------------------------------------------
MESSAGES = [{"role": "user", "content": "hi"}]


def test_chat_uses_the_checkpoint_template(llm, make_ckpt):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(make_ckpt("olmoe"))
    want = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    out = llm.chat(MESSAGES, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert out.prompt_token_ids == llm.tokenizer.encode(want)
    assert llm.tokenizer.tok.token_to_id("<|assistant|>") in out.prompt_token_ids
    assert out.token_ids == greedy(llm, want, 4).token_ids


def test_chat_follows_a_changed_template(make_ckpt, tmp_path):
    src = make_ckpt("olmoe")
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}>>{% endif %}"
    )
    llm = LLM(copy_with(src, tmp_path, "chat", tokenizer_config=tok_cfg), dtype="fp32")
    out = llm.chat(MESSAGES, SamplingParams(max_tokens=2))
    assert out.prompt_token_ids == llm.tokenizer.encode("[user]hi>>")


def test_generation_config_sampling_defaults(llm, make_ckpt, tmp_path):
    src = make_ckpt("olmoe")
    gen = {"eos_token_id": 0, "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9}
    sampling = LLM(copy_with(src, tmp_path, "sample", generation_config=gen), dtype="fp32")
    filled = SamplingParams().with_defaults(sampling.generation_config)
    assert (filled.temperature, filled.top_k, filled.top_p) == (0.7, 20, 0.9)
    explicit = SamplingParams(temperature=0.0, top_k=5).with_defaults(sampling.generation_config)
    assert (explicit.temperature, explicit.top_k, explicit.top_p) == (0.0, 5, 0.9)

    # The engine applies them: unset fields behave like the explicit values.
    implicit = sampling.generate(PROMPTS[0], SamplingParams(max_tokens=16, seed=5, ignore_eos=True))[0]
    sp = SamplingParams(max_tokens=16, seed=5, ignore_eos=True, temperature=0.7, top_k=20, top_p=0.9)
    assert implicit.token_ids == sampling.generate(PROMPTS[0], sp)[0].token_ids
    assert implicit.token_ids != greedy(llm, PROMPTS[0], 16).token_ids

    # do_sample false (the synthetic default): unset temperature means greedy.
    assert llm.generation_config.get("do_sample") is False
    assert SamplingParams().with_defaults(llm.generation_config).temperature == 0.0
    plain = llm.generate(PROMPTS[0], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert plain.token_ids == greedy(llm, PROMPTS[0], 16).token_ids


def test_stats_count_prompt_and_generated_tokens(llm):
    rss_before = psutil.Process().memory_info().rss
    outs = llm.generate(PROMPTS, GREEDY)
    stats = llm.stats()
    assert stats.prefill_tokens == sum(len(o.prompt_token_ids) - o.cached_tokens for o in outs)
    assert stats.decode_tokens == sum(len(o.token_ids) - 1 for o in outs)  # the first comes from prefill
    # A peak of this process's resident memory, in bytes: at least what it held before, at most the RAM.
    assert rss_before <= stats.peak_rss_bytes <= psutil.virtual_memory().total
