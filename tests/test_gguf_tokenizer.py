"""The tokenizer and chat template of a GGUF file (tilemem.loader.gguf_tokenizer, TextTokenizer on a .gguf).

Token ids are compared with transformers' GGUF conversion (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`)
on files written here with gguf.GGUFWriter, and, when TILEMEM_LLAMACPP names a llama.cpp build, with
`llama-tokenize`, on a file written by llama.cpp's own converter, and with the reference ids llama.cpp ships
for real vocabularies (made by each model's original tokenizer). Where transformers and llama.cpp disagree we
follow llama.cpp (see the module docstring of gguf_tokenizer); those texts are compared with llama.cpp only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import llamacpp_tools
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tilemem.engine.tokenizer import TextTokenizer
from tilemem.errors import CheckpointError, RequestError
from tilemem.loader.gguf_tokenizer import read_metadata, tokenizer_from_metadata
from tilemem.synth.corpus import docstrings, stdlib_sources
from tilemem.synth.tokenizer import CHAT_TEMPLATE, trained_json
from tilemem.synth.writer import synthesize

# Texts every tokenizer reads the same whatever the leading-space rule (transformers == llama.cpp).
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3.14159!",
    "def f(x):\n    return x  + 1\n\n\n# done",
    "naïve café, Äpfel, нещо на Български, 日本語のテキスト 🎉🦙 😶\u200d🌫️",
    "whitespace   runs\t\ttabs\r\nCRLF    and trailing  ",
    "digits 12345 678 9000000 1,000.5",
    "Hello<|user|>",
    "I'll we've they're DON'T",
]
# Texts with a leading space, or text right after a special token: SentencePiece (llama.cpp, the original
# tokenizers) puts a U+2581 there, transformers' GGUF conversion does not.
SPACE_TEXTS = [" Hello world", "  two spaces", "<|user|>\nhi there<|end|>\n<|assistant|>", "x <think> y</think>"]


@dataclass
class Vocab:
    """The tokenizer.ggml.* fields of a file to write."""

    model: str
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    merges: list[str] | None = None
    scores: list[float] | None = None
    ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad -> id
    add_bos: bool | None = None
    template: str | None = None


def write_gguf(path: Path, vocab: Vocab) -> Path:
    """A GGUF file with `vocab`'s tokenizer metadata, llama hyperparameters and one tiny tensor."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.merges is not None:
        w.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    adders = {
        "bos": w.add_bos_token_id,
        "eos": w.add_eos_token_id,
        "unk": w.add_unk_token_id,
        "pad": w.add_pad_token_id,
    }
    for name, index in vocab.ids.items():
        adders[name](index)
    if vocab.add_bos is not None:
        w.add_add_bos_token(vocab.add_bos)
    if vocab.template is not None:
        w.add_chat_template(vocab.template)
    w.add_tensor("token_embd.weight", np.zeros((len(vocab.tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def bpe_vocab() -> Vocab:
    """Our synthetic byte-level BPE tokenizer (the one synth checkpoints ship), plus two user-defined tokens."""
    data = json.loads(trained_json(512))
    tok = Tokenizer.from_str(json.dumps(data))
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    special = {a["content"] for a in data["added_tokens"] if a["special"]}
    types = [3 if t in special else 1 for t in tokens]
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    tokens += ["<think>", "</think>"]
    types += [4, 4]
    eos = tokens.index("<|endoftext|>")
    return Vocab("gpt2", tokens, types, "olmo", merges, ids={"eos": eos, "pad": eos}, template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def spm_vocab() -> Vocab:
    """A SentencePiece-style llama vocabulary: <unk> <s> </s>, 256 <0xNN> byte tokens, pieces with U+2581 for
    spaces scored by merge order (trained here with tokenizers' BPE), control and user-defined tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False, initial_alphabet=["\u2581"])
    tok.train_from_iterator(docstrings(150_000), trainer)
    pieces = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for rank, (piece, _) in enumerate(pieces):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(rank))
    for token, kind in [("<|user|>", 3), ("<|assistant|>", 3), ("<|end|>", 3), ("<think>", 4), ("</think>", 4)]:
        tokens.append(token)
        types.append(kind)
        scores.append(0.0)
    template = "{{ bos_token }}" + CHAT_TEMPLATE
    return Vocab("llama", tokens, types, None, scores=scores, ids={"unk": 0, "bos": 1, "eos": 2}, template=template)


def with_(vocab: Vocab, **changes: Any) -> Vocab:
    return Vocab(**{**vocab.__dict__, **changes})


def ours(path: Path) -> Tokenizer:
    return tokenizer_from_metadata(read_metadata(path), str(path)).tokenizer


def transformers_ids(path: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return [hf.encode(t, add_special_tokens=False) for t in texts]


def assert_round_trip(tok: Tokenizer, texts: list[str]) -> None:
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("pre", ["olmo", "gpt-2", "qwen2", "llama-bpe"])
def test_byte_level_bpe_matches_transformers(bpe_vocab: Vocab, pre: str, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "bpe.gguf", with_(bpe_vocab, pre=pre))
    tok = ours(path)
    texts = TEXTS + SPACE_TEXTS
    got = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    assert got == transformers_ids(path, texts)
    assert_round_trip(tok, texts)
    # Special and user-defined tokens in text stay whole; decoding skips only the special ones.
    ids = tok.encode("a<|user|>b<think>c", add_special_tokens=False).ids
    assert bpe_vocab.tokens.index("<|user|>") in ids and bpe_vocab.tokens.index("<think>") in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab<think>c"


def test_pretokenizers_split_as_llamacpp(bpe_vocab: Vocab, tmp_path: Path) -> None:
    """The split regexes of the pre-tokenizers transformers does not know (it falls back to GPT-2's)."""
    pieces: dict[str, list[str]] = {}
    for pre in ["default", "deepseek-llm", "deepseek-v3", "olmo"]:
        tok = ours(write_gguf(tmp_path / f"{pre}.gguf", with_(bpe_vocab, pre=pre)))
        assert tok.pre_tokenizer is not None
        pieces[pre] = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("x 12345 (a)")]
    assert pieces["olmo"] == ["x", "Ġ12345", "Ġ(", "a", ")"]
    assert pieces["default"] == ["x", "Ġ", "123", "45", "Ġ", "(", "a", ")"]
    assert pieces["deepseek-llm"] == ["x", "Ġ", "12345", "Ġ(", "a", ")"]
    assert pieces["deepseek-v3"] == ["x", "Ġ", "123", "45", "Ġ(", "a", ")"]


def test_sentencepiece_vocab_matches_transformers(spm_vocab: Vocab, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "spm.gguf", spm_vocab)
    tok = ours(path)
    got = [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]
    assert got == transformers_ids(path, TEXTS)
    assert_round_trip(tok, TEXTS + [" Hello world", "  two spaces"])
    # Byte fallback: a character the vocabulary lacks is its UTF-8 bytes.
    emoji = tok.encode("🦙", add_special_tokens=False).tokens
    assert emoji[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    # SentencePiece's leading-space rule (llama.cpp and the original tokenizer.json; transformers differs).
    space = spm_vocab.tokens.index("\u2581")
    hello = tok.encode("Hello", add_special_tokens=False).ids
    assert tok.encode(" Hello", add_special_tokens=False).ids == [space, *hello]
    user = spm_vocab.tokens.index("<|user|>")
    assert tok.encode("<|user|>Hello", add_special_tokens=False).ids == [user, *hello]
    assert tok.encode("Hello").ids[0] == 1  # add_bos: llama vocabularies start prompts with <s>


def test_ids_equal_llamacpp_on_written_files(bpe_vocab: Vocab, spm_vocab: Vocab, tmp_path: Path) -> None:
    llamacpp_tools.llamacpp_dir()
    files = [write_gguf(tmp_path / "spm.gguf", spm_vocab)]
    for pre in ["olmo", "qwen2", "llama-bpe", "default", "deepseek-llm", "deepseek-v3"]:
        files.append(write_gguf(tmp_path / f"bpe-{pre}.gguf", with_(bpe_vocab, pre=pre)))
    for path in files:
        tok = ours(path)
        for text in TEXTS + SPACE_TEXTS:
            assert tok.encode(text, add_special_tokens=False).ids == llamacpp_tools.tokenize(path, text, tmp_path), (
                path.name,
                text,
            )


def test_llamacpp_converted_checkpoint(tmp_path: Path) -> None:
    """A file written by llama.cpp's converter from a synth checkpoint: the same ids as the checkpoint's own
    tokenizer.json, as transformers' conversion and as llama-tokenize; the same chat prompt and eos."""
    llamacpp_tools.llamacpp_dir()
    ckpt = synthesize("olmoe", "tiny", tmp_path / "ckpt", progress=False)
    path = llamacpp_tools.convert(ckpt, tmp_path / "olmoe.gguf", "f32")
    from_file, from_dir = TextTokenizer(path), TextTokenizer(ckpt)
    texts = TEXTS + SPACE_TEXTS
    got = [from_file.encode(t) for t in texts]
    assert got == [from_dir.encode(t) for t in texts]
    from transformers import PreTrainedTokenizerFast

    # olmoe is no architecture transformers reads from GGUF, so AutoTokenizer cannot pick a class; the
    # conversion (TokenizersBackend's gguf_file branch) is the same.
    hf = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    assert got == [hf.encode(t, add_special_tokens=False) for t in texts]
    for text in TEXTS[3:7]:
        assert from_file.encode(text) == llamacpp_tools.tokenize(path, text, tmp_path)
    assert [from_file.decode(ids) for ids in got] == [from_dir.decode(ids) for ids in got]
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    assert from_file.apply_chat_template(chat) == from_dir.apply_chat_template(chat)
    assert (from_file.eos_token, from_file.eos_id) == (from_dir.eos_token, from_dir.eos_id)
    # llama-quantize and llama-gguf-split keep the tokenizer; a later part of a split set names the first.
    quantized = TextTokenizer(llamacpp_tools.quantize(path, tmp_path / "olmoe-q8_0.gguf", "Q8_0"))
    assert [quantized.encode(t) for t in texts] == got
    first, second = llamacpp_tools.split(path, tmp_path / "part", max_tensors=14)
    assert [TextTokenizer(first).encode(t) for t in texts] == got
    with pytest.raises(
        CheckpointError, match=r"part-00002-of-00002\.gguf is part 2 of a split GGUF set.*part-00001-of"
    ):
        TextTokenizer(second)


# Real vocabularies llama.cpp ships for its own tokenizer tests, with the ids the model's original
# tokenizer gives for each test text (DIR/llama.cpp/models/ggml-vocab-NAME.gguf{,.inp,.out}).
LLAMACPP_VOCABS = [
    *("llama-spm", "phi-3", "llama-bpe", "qwen2", "qwen35", "deepseek-llm", "deepseek-coder"),
    *("gpt-2", "mpt", "falcon", "starcoder", "refact"),
]


@pytest.mark.parametrize("name", LLAMACPP_VOCABS)
def test_real_vocabularies_match_original_tokenizers(name: str, long_text: str, tmp_path: Path) -> None:
    models_dir = llamacpp_tools.llamacpp_dir() / "llama.cpp" / "models"
    path = models_dir / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path} is not in this llama.cpp build")
    sep = "\n__ggml_vocab_test__\n"
    texts = path.with_name(path.name + ".inp").read_text(encoding="utf-8").split(sep)
    texts[-1] = texts[-1].removesuffix(sep.rstrip("\n"))
    expected = [[int(t) for t in line.split()] for line in path.with_name(path.name + ".out").read_text().split("\n")]
    tok = TextTokenizer(path)
    for text, ids in zip(texts, expected, strict=False):
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text, text
    got = tok.encode(long_text)
    assert got == llamacpp_tools.tokenize(path, long_text, tmp_path)
    assert tok.decode(got) == long_text


@pytest.fixture(scope="module")
def long_text() -> str:
    """About 40k characters: English prose, Python source, and the multilingual text of TEXTS (without special
    tokens: llama.cpp strips spaces around some of Phi-3's, its tokenizer.json does not)."""
    prose = "".join(docstrings(20_000))[:20_000]
    code = "".join(stdlib_sources(40_000))[:15_000]
    return prose + code + "".join(t for t in TEXTS if "<|" not in t) * 20


def test_chat_template_and_special_tokens(spm_vocab: Vocab, tmp_path: Path) -> None:
    tok = TextTokenizer(write_gguf(tmp_path / "spm.gguf", spm_vocab))
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<s><|user|>\nhi<|end|>\n<|assistant|>\n"
    assert (tok.eos_token, tok.eos_id, tok.add_bos) == ("</s>", 2, True)
    ids = tok.encode(prompt)
    assert ids[0] == 1 and spm_vocab.tokens.index("<|assistant|>") in ids
    # Special tokens skipped; each stretch of text after one got a U+2581 (a space), only the first is stripped.
    assert tok.decode(ids) == "\nhi \n \n"


# MoE families of issue 21 first, then templates that use raise_exception (gemma-2 refuses a system turn),
# strftime_now (Llama 3.1), {% generation %} (LFM2.5), loop controls, or iterate `tools` (Hermes: a TypeError).
CHAT_TEMPLATES = [
    *("Qwen-Qwen3-0.6B", "Qwen3-Coder", "deepseek-ai-DeepSeek-V3.1", "deepseek-ai-DeepSeek-V3.2", "MiniMax-M2"),
    *("moonshotai-Kimi-K2", "GLM-4.6", "openai-gpt-oss-120b", "google-gemma-2-2b-it"),
    *("meta-llama-Llama-3.1-8B-Instruct", "LFM2.5-8B-A1B", "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use"),
    *("mistralai-Mistral-Nemo-Instruct-2407", "Cohere2MoE", "ibm-granite-granite-4.0"),
]


def test_chat_templates_render_as_transformers(bpe_vocab: Vocab, tmp_path: Path) -> None:
    """The chat templates llama.cpp collects from real models (Qwen3, DeepSeek-V3, Llama 3.1, ...) render from a
    GGUF file exactly as transformers renders them, refusals (raise_exception) included."""
    from transformers.utils.chat_template_utils import render_jinja_template

    folder = llamacpp_tools.llamacpp_dir() / "llama.cpp" / "models" / "templates"
    templates = [folder / f"{name}.jinja" for name in CHAT_TEMPLATES if (folder / f"{name}.jinja").exists()]
    if len(templates) < 6:
        pytest.skip(f"{folder} lacks the chat templates this test reads")
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! <b>x</b>"},
        {"role": "user", "content": "2+2?"},
    ]
    rendered = 0
    for template in templates:
        source = template.read_text(encoding="utf-8")
        tok = TextTokenizer(write_gguf(tmp_path / "t.gguf", with_(bpe_vocab, template=source, ids={"eos": 0})))
        try:
            want = render_jinja_template(
                [chat], chat_template=source, add_generation_prompt=True, bos_token="", eos_token=tok.eos_token
            )
        except Exception:  # the template refuses this chat (e.g. no system role): so must we, clearly
            with pytest.raises(RequestError, match="the chat template cannot render these messages"):
                tok.apply_chat_template(chat)
            continue
        assert tok.apply_chat_template(chat) == want[0][0], template.name
        rendered += 1
    assert rendered >= len(templates) // 2


def test_chat_template_refusal_and_optional_variables(bpe_vocab: Vocab, tmp_path: Path) -> None:
    template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% if tools %}TOOLS{% endif %}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% if enable_thinking is false %}<think></think>{% endif %}"
        "{% endif %}"
    )
    tok = TextTokenizer(write_gguf(tmp_path / "t.gguf", with_(bpe_vocab, template=template)))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi[assistant]"
    with pytest.raises(RequestError, match="System role not supported"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_file_without_template_or_add_bos(bpe_vocab: Vocab, tmp_path: Path) -> None:
    vocab = tokenizer_from_metadata(
        read_metadata(write_gguf(tmp_path / "b.gguf", with_(bpe_vocab, template=None))), "b.gguf"
    )
    assert vocab.chat_template is None and vocab.bos_token is None and not vocab.add_bos
    assert vocab.eos_token == "<|endoftext|>"
    forced = write_gguf(tmp_path / "f.gguf", with_(bpe_vocab, ids={"bos": 0, "eos": 0}, add_bos=True))
    vocab = tokenizer_from_metadata(read_metadata(forced), "f.gguf")
    assert vocab.add_bos and vocab.tokenizer.encode("hi").ids[0] == 0


def test_bad_files_error_clearly(bpe_vocab: Vocab, tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n" * 4)
    with pytest.raises(CheckpointError, match=r"notes\.gguf is not a GGUF file"):
        TextTokenizer(text)
    good = write_gguf(tmp_path / "good.gguf", bpe_vocab)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: the GGUF metadata is truncated"):
        TextTokenizer(cut)
    with pytest.raises(CheckpointError, match=r"missing\.gguf does not exist"):
        TextTokenizer(tmp_path / "missing.gguf")
    unknown = write_gguf(tmp_path / "t5.gguf", with_(bpe_vocab, model="t5"))
    with pytest.raises(
        CheckpointError, match=r"t5\.gguf: tokenizer model 't5' is not supported \(supported: gpt2, llama"
    ):
        TextTokenizer(unknown)
    pre = write_gguf(tmp_path / "pre.gguf", with_(bpe_vocab, pre="made-up"))
    with pytest.raises(CheckpointError, match=r"pre-tokenizer 'made-up' .* is not supported"):
        TextTokenizer(pre)
    meta = read_metadata(good)
    meta.pop("tokenizer.ggml.tokens")
    with pytest.raises(CheckpointError, match=r"x\.gguf has no tokenizer .* the first file"):
        tokenizer_from_metadata(meta, "x.gguf")
    bad_template = write_gguf(tmp_path / "tpl.gguf", with_(bpe_vocab, template="{% for %}"))
    with pytest.raises(CheckpointError, match=r"tpl\.gguf: tokenizer\.chat_template is not a valid Jinja"):
        TextTokenizer(bad_template)
    with pytest.raises(CheckpointError, match=r"outside the vocabulary"):
        tokenizer_from_metadata(
            {**meta, "tokenizer.ggml.tokens": bpe_vocab.tokens, "tokenizer.ggml.eos_token_id": 10**6}, "y"
        )


def test_read_metadata_values(bpe_vocab: Vocab, tmp_path: Path) -> None:
    """Decoded Python values, the same as gguf.GGUFReader's."""
    path = write_gguf(tmp_path / "m.gguf", bpe_vocab)
    meta = read_metadata(path)
    reader = gguf.GGUFReader(path)
    assert meta == {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 1
    assert meta["tokenizer.ggml.tokens"] == bpe_vocab.tokens and meta["tokenizer.ggml.token_type"] == bpe_vocab.types
