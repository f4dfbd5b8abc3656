"""A real byte-level BPE tokenizer for synthetic checkpoints, trained on standard-library text."""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tilemem.errors import ConfigError
from tilemem.synth.corpus import docstrings, stdlib_sources

SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MAX_TRAINED_VOCAB = 8192


@functools.lru_cache(maxsize=4)
def trained_json(vocab_size: int) -> str:
    """Serialized tokenizer for `vocab_size` (training is deterministic, so it is cached per process)."""
    return train_tokenizer(vocab_size).to_str()


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE with exactly `vocab_size` ids: trained merges, then reserved tokens."""
    trained = min(vocab_size, MAX_TRAINED_VOCAB)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=trained,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = itertools.chain(itertools.islice(stdlib_sources(1_500_000), 10_000), docstrings(500_000))
    tok.train_from_iterator(text, trainer)
    # Random-weight models may emit any id < vocab_size; give every id a visible token.
    extra = vocab_size - tok.get_vocab_size()
    if extra > 0:
        tok.add_tokens([f"<|reserved_{i}|>" for i in range(extra)])
    return tok


def write_tokenizer(out: Path, vocab_size: int) -> dict[str, int]:
    """Write tokenizer.json and tokenizer_config.json; return the special token ids."""
    tok = Tokenizer.from_str(trained_json(vocab_size))
    if tok.get_vocab_size() != vocab_size:  # byte alphabet + special tokens do not fit
        raise ConfigError(
            f"vocab_size {vocab_size} is too small for the byte-level tokenizer, which needs at least "
            f"{tok.get_vocab_size()} ids; raise vocab_size."
        )
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS, "pad_token": EOS}, indent=2))
    return ids
