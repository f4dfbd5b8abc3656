"""The tokenizer and chat template a GGUF file describes, rebuilt with `tokenizers`.

A GGUF file carries no tokenizer.json; llama.cpp stores the vocabulary as metadata (`tokenizer.ggml.*`).
Two models cover the MoE files people run:

- `gpt2`: byte-level BPE with `tokenizer.ggml.merges`; the pre-tokenizer (how text is split before the
  merges) is named by `tokenizer.ggml.pre` and spelled out here as in llama.cpp's `llama-vocab.cpp`.
- `llama`: a SentencePiece vocabulary with `tokenizer.ggml.scores`, spaces as U+2581 and `<0xNN>` byte
  tokens for what the vocabulary lacks; BPE merges are recovered from the scores, as transformers does.

Token ids equal the model's original tokenizer and llama.cpp's (checked on llama.cpp's reference
vocabularies) and transformers' GGUF conversion (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`)
except where transformers differs from both: a SentencePiece vocabulary gets a U+2581 before text that
starts with a space and after each special token (transformers: only at offset 0, and not when the text
starts with a space); llama3-style pre-tokenizers keep a word the vocabulary holds whole (`ignore_merges`);
`default`, `deepseek-llm`, `deepseek-v3`, `deepseek-coder`, `falcon`, `starcoder` split text with llama.cpp's
regexes (transformers falls back to GPT-2's); a control token outside the byte alphabet (DeepSeek's
`<｜begin▁of▁sentence｜>`) stays a special token (transformers respells it as bytes).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from tilemem.errors import CheckpointError

# llama.cpp's token types (gguf.TokenType): only these change how a token is matched.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
_SPACE = "\u2581"  # SentencePiece's visible space

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_STARCODER_SPLITS = (r"\p{N}", _GPT2_WORDS)
_FALCON_SPLITS = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_WORDS, r"[0-9][0-9][0-9]")
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT (also what it uses when a file names no pre-tokenizer).
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_WORDS, r"\p{N}+", r"[0-9][0-9][0-9]")
# Written with escapes: an editor's Unicode normalisation would break the ranges (U+1FD3 -> U+0390).
_DEEPSEEK_LLM_SPLITS = (
    "[\r\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
)
_DEEPSEEK_V3_SPLITS = (
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)
_DEEPSEEK_CODER_SPLITS = (
    "[\r\n]",
    "\\s?\\p{L}+",
    "\\s?\\p{P}+",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}",
)


def _names(names: str, splits: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return dict.fromkeys(names.split(), splits)


# `tokenizer.ggml.pre` -> the regexes that split the text, in order (each splits the pieces of the last),
# as llama.cpp's llm_tokenizer_bpe. An empty tuple: GPT-2's own split.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    **_names("gpt-2 gpt2 olmo mpt phi-2 jais exaone4 gigachat roberta-bpe trillion", ()),
    **_names("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 dbrx smaug-bpe", (_LLAMA3_SPLIT,)),
    **_names("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open", (_QWEN2_SPLIT,)),
    "qwen35": (_QWEN35_SPLIT,),
    "tekken": (_TEKKEN_SPLIT,),
    **_names("gpt-4o llama4 kanana2 minimax-m2", (_GPT4O_SPLIT,)),
    **_names("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2", _STARCODER_SPLITS),
    "falcon": _FALCON_SPLITS,
    "default": _DEFAULT_SPLITS,
    "deepseek-llm": _DEEPSEEK_LLM_SPLITS,
    **_names("deepseek-v3 hunyuan-dense", _DEEPSEEK_V3_SPLITS),
    "deepseek-coder": _DEEPSEEK_CODER_SPLITS,
}
# Pre-tokenizers whose words found whole in the vocabulary skip the merges (llama.cpp's ignore_merges, and
# the original tokenizer.json's; transformers' GGUF conversion misses it: "Cửa Việt" splits differently).
_IGNORE_MERGES = frozenset("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 tekken".split())
# Pre-tokenizers for which llama.cpp adds a BOS token when the file does not say (`add_bos_token`).
_BPE_ADD_BOS = frozenset("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 tekken".split())


@dataclass(frozen=True)
class GgufVocab:
    """A GGUF file's tokenizer with what generation needs besides it."""

    tokenizer: Tokenizer
    """Encodes and decodes; special tokens of the file are added tokens (matched whole in text)."""
    chat_template: str | None
    """`tokenizer.chat_template` (Jinja), or None when the file has none."""
    bos_token: str | None
    """Text of `tokenizer.ggml.bos_token_id`, or None."""
    eos_token: str | None
    """Text of `tokenizer.ggml.eos_token_id`, or None."""
    add_bos: bool
    """Whether a prompt starts with the BOS token (`tokenizer.ggml.add_bos_token`, else llama.cpp's default)."""


def read_metadata(path: str | Path) -> dict[str, Any]:
    """A GGUF file's key-value metadata as Python values (str, int, float, bool; arrays as lists).

    Parsed here rather than by `gguf.GGUFReader`, which takes ~5 s on a 50k-token vocabulary (it builds
    numpy views per string); this reads the same header in ~0.1 s and stops before the tensor table.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24:
                raise _NotGguf("it is shorter than a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse_metadata(buf)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; pass a .gguf file or a checkpoint directory.") from None
    except _NotGguf as exc:
        raise CheckpointError(
            f"{path} is not a GGUF file ({exc}); pass a .gguf file or a checkpoint directory."
        ) from None
    except (struct.error, ValueError, OSError, IndexError) as exc:
        raise CheckpointError(
            f"{path}: the GGUF metadata is truncated or corrupt ({exc}); re-download or re-convert the file."
        ) from None


class _NotGguf(Exception):
    """Wrong magic or an unsupported version."""


_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _parse_metadata(buf: mmap.mmap) -> dict[str, Any]:
    if len(buf) < 24 or buf[:4] != b"GGUF":
        raise _NotGguf(f"it starts with {bytes(buf[:4])!r}, not the magic b'GGUF'")
    order = "<"
    version = struct.unpack_from("<I", buf, 4)[0]
    if version & 0xFFFF == 0:  # a big-endian file
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise _NotGguf(f"GGUF version {version}; versions 2 and 3 are supported")
    n_kv = struct.unpack_from(order + "Q", buf, 16)[0]
    pos = 24

    def string(at: int) -> tuple[str, int]:
        n = struct.unpack_from(order + "Q", buf, at)[0]
        if at + 8 + n > len(buf):
            raise ValueError(f"a string of {n} bytes at offset {at} runs past the end of the file")
        return buf[at + 8 : at + 8 + n].decode("utf-8", "replace"), at + 8 + n

    def value(kind: int, at: int) -> tuple[Any, int]:
        if kind == _STRING:
            return string(at)
        if kind == _ARRAY:
            item, count = struct.unpack_from(order + "IQ", buf, at)
            at += 12
            if item in _SCALAR_FORMATS:
                dtype = np.dtype(order + _SCALAR_FORMATS[item])
                if at + count * dtype.itemsize > len(buf):
                    raise ValueError(f"an array of {count} items at offset {at} runs past the end of the file")
                arr = np.frombuffer(buf, dtype=dtype, count=count, offset=at)
                return arr.tolist(), at + count * dtype.itemsize
            items = []
            for _ in range(count):
                v, at = value(item, at)
                items.append(v)
            return items, at
        fmt = _SCALAR_FORMATS.get(kind)
        if fmt is None:
            raise ValueError(f"unknown metadata value type {kind} at offset {at}")
        return struct.unpack_from(order + fmt, buf, at)[0], at + struct.calcsize(fmt)

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        kind = struct.unpack_from(order + "I", buf, pos)[0]
        meta[key], pos = value(kind, pos + 4)
    return meta


def tokenizer_from_metadata(meta: Mapping[str, Any], source: str) -> GgufVocab:
    """The tokenizer described by GGUF metadata `meta` (from `read_metadata`); `source` names the file in errors."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    part = meta.get("split.no")
    if model is None and isinstance(part, int) and part > 0:
        first = re.sub(r"-(\d{5})-of-(\d{5})\.gguf$", r"-00001-of-\2.gguf", source)
        raise CheckpointError(
            f"{source} is part {part + 1} of a split GGUF set; its metadata is in the first part: pass {first}."
        )
    if model is None or not isinstance(tokens, list) or not tokens:
        raise CheckpointError(
            f"{source} has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens); of a split set pass "
            "the first file (-00001-of-N.gguf), or pass prompts as lists of token ids."
        )
    builder = _BUILDERS.get(str(model))
    if builder is None:
        raise CheckpointError(
            f"{source}: tokenizer model {model!r} is not supported (supported: {', '.join(sorted(_BUILDERS))})."
        )
    token_types = list(meta.get("tokenizer.ggml.token_type") or [])
    tok = builder(meta, tokens, token_types, source)

    def token_at(key: str) -> str | None:
        index = meta.get(key)
        if index is None:
            return None
        if not isinstance(index, int) or not 0 <= index < len(tokens):
            raise CheckpointError(f"{source}: {key} = {index!r} is outside the vocabulary of {len(tokens)} tokens.")
        return tokens[index]

    bos, eos = token_at("tokenizer.ggml.bos_token_id"), token_at("tokenizer.ggml.eos_token_id")
    unk, pad = token_at("tokenizer.ggml.unknown_token_id"), token_at("tokenizer.ggml.padding_token_id")
    _add_special(tok, tokens, token_types, {t for t in (bos, eos, unk, pad) if t is not None})
    default_bos = model == "llama" or meta.get("tokenizer.ggml.pre") in _BPE_ADD_BOS
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and bos is not None
    if add_bos:
        bos_id = meta["tokenizer.ggml.bos_token_id"]
        tok.post_processor = processors.TemplateProcessing(
            single=[bos, "$A"], pair=[bos, "$A", bos, "$B"], special_tokens=[(bos, bos_id)]
        )
    template = meta.get("tokenizer.chat_template")
    return GgufVocab(
        tokenizer=tok,
        chat_template=template if isinstance(template, str) else None,
        bos_token=bos,
        eos_token=eos,
        add_bos=add_bos,
    )


def _byte_level(meta: Mapping[str, Any], tokens: list[str], token_types: list[int], source: str) -> Tokenizer:
    """Byte-level BPE (`tokenizer.ggml.model = gpt2`)."""
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise CheckpointError(
            f"{source}: a gpt2 (byte-level BPE) tokenizer needs tokenizer.ggml.merges; it is missing."
        )
    pre = meta.get("tokenizer.ggml.pre") or "default"
    splits = PRE_TOKENIZER_SPLITS.get(str(pre))
    if splits is None:
        raise CheckpointError(
            f"{source}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported "
            f"(supported: {', '.join(sorted(PRE_TOKENIZER_SPLITS))})."
        )
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    special = {_CONTROL, _USER_DEFINED, _UNKNOWN}
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        # A token in the byte alphabet already is one; control tokens like DeepSeek's "<｜begin▁of▁sentence｜>"
        # keep their spelling (they are matched whole, as added tokens); other text is respelled as bytes.
        kind = token_types[index] if index < len(token_types) else 1
        if not set(token) <= spelled and kind not in special:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab[token] = index
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(
        vocab=vocab,
        merges=[p for p in pairs if len(p) == 2],
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        ignore_merges=pre in _IGNORE_MERGES,
    )
    tok = Tokenizer(bpe)
    if splits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: Mapping[str, Any], tokens: list[str], token_types: list[int], source: str) -> Tokenizer:
    """A SentencePiece vocabulary (`tokenizer.ggml.model = llama`) as BPE with byte fallback."""
    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) < len(tokens):
        raise CheckpointError(
            f"{source}: a llama (SentencePiece) tokenizer needs tokenizer.ggml.scores, one per token."
        )
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    if isinstance(merges, list):
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores, strict=False)))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    bpe = models.BPE(
        vocab=vocab,
        merges=[p for p in pairs if len(p) == 2],
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
        dropout=None,
    )
    tok = Tokenizer(bpe)
    # One U+2581 before every stretch of text, also after a special token in it, and every space as U+2581:
    # llama.cpp's SPM tokenizer and Llama/Mixtral's original tokenizer.json. (transformers' GGUF conversion
    # uses Metaspace(prepend_scheme="first"), which adds none after a special token and none before text that
    # starts with a space: " Hello" gives it [▁Hello] where SentencePiece gives [▁, ▁Hello].)
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend(_SPACE)] if add_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPACE)])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=" ", left=1, right=0)] if add_prefix else [])
    )
    return tok


_BUILDERS: dict[str, Callable[[Mapping[str, Any], list[str], list[int], str], Tokenizer]] = {
    "gpt2": _byte_level,
    "llama": _sentencepiece,
}


def _merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best score
    first (transformers' `generate_merges`, so the ids match its conversion)."""
    found: list[tuple[str, str, float]] = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _add_special(tok: Tokenizer, tokens: Sequence[str], token_types: Sequence[int], named: set[str]) -> None:
    """Control and unknown tokens (and bos/eos/unk/pad) become special added tokens, user-defined ones plain
    added tokens: llama.cpp matches both whole in text, and decoding skips only the special ones."""
    vocab = tok.get_vocab()
    special: list[AddedToken] = []
    plain: list[AddedToken] = []
    for index, token in enumerate(tokens):
        kind = token_types[index] if index < len(token_types) else 1
        if vocab.get(token) != index:  # a duplicate spelling, or respelled as bytes: not matchable as typed
            continue
        if kind in (_CONTROL, _UNKNOWN) or token in named:
            special.append(AddedToken(token, normalized=False, special=True))
        elif kind == _USER_DEFINED:
            plain.append(AddedToken(token, normalized=False, special=False))
    if special:
        tok.add_special_tokens(special)
    if plain:
        tok.add_tokens(plain)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (as `bytes_to_unicode` in GPT-2 and transformers)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}
