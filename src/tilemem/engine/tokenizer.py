"""Tokenizer from the checkpoint's tokenizer.json, or a GGUF file's metadata (tokenizers), and chat template
(jinja2)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from tilemem.errors import CheckpointError, RequestError
from tilemem.jsonio import read_json_object
from tilemem.loader.gguf_tokenizer import read_metadata, tokenizer_from_metadata


class TextTokenizer:
    """Encodes prompts, decodes ids, applies the chat template, and detokenizes incrementally."""

    def __init__(self, path: str | Path) -> None:
        """`path`: a checkpoint directory (tokenizer.json, tokenizer_config.json) or a .gguf file (the first
        file of a split set)."""
        path = Path(path)
        if path.suffix == ".gguf" or path.is_file():
            self._init_gguf(path)
            return
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise CheckpointError(
                f"{path} has no tokenizer.json; pass prompts as lists of token ids, or add the tokenizer."
            )
        try:
            self.tok = Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # tokenizers raises a bare Exception for any malformed file
            raise CheckpointError(f"{tok_file} cannot be read ({exc}); fix or re-download it.") from None
        cfg_file = path / "tokenizer_config.json"
        self.config = read_json_object(cfg_file, CheckpointError) if cfg_file.exists() else {}
        template = self.config.get("chat_template")
        self.template = _compile_template(template, f"{cfg_file}: chat_template")
        eos = self.config.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        self.eos_token = eos
        self.eos_id = self.tok.token_to_id(eos) if eos else None
        self.add_bos = False  # the model's BOS before a plain prompt (GGUF: add_bos_token); encode() never adds it

    def _init_gguf(self, path: Path) -> None:
        vocab = tokenizer_from_metadata(read_metadata(path), str(path))
        self.tok = vocab.tokenizer
        self.config = {"bos_token": vocab.bos_token, "eos_token": vocab.eos_token, "chat_template": vocab.chat_template}
        self.template = _compile_template(vocab.chat_template, f"{path}: tokenizer.chat_template")
        self.eos_token = vocab.eos_token
        self.eos_id = self.tok.token_to_id(vocab.eos_token) if vocab.eos_token else None
        self.add_bos = vocab.add_bos

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a chat, from the checkpoint's template."""
        if self.template is None:
            raise RequestError(
                "this checkpoint has no chat template (tokenizer_config.json chat_template, or a GGUF file's "
                "tokenizer.chat_template); use a plain prompt."
            )
        try:
            return self.template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.config.get("bos_token") or "",
                eos_token=self.eos_token or "",
            )
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:
            # raise_exception() in the template (e.g. "System role not supported"), or the template's own bug
            raise RequestError(f"the chat template cannot render these messages: {exc}") from None


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant turns with it): the body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(template: object, where: str) -> jinja2.Template | None:
    """The chat template compiled as transformers does (sandboxed, undefined names are empty, its globals
    raise_exception and strftime_now, its tojson), or None when there is none; `where` names it in errors."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template) if isinstance(template, str) else None
    except jinja2.TemplateSyntaxError as exc:
        raise CheckpointError(f"{where} is not a valid Jinja template (line {exc.lineno}: {exc.message}).") from None


class IncrementalDecoder:
    """Turns a growing list of ids into text deltas without splitting multi-byte characters."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (may be empty)."""
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for more bytes
            return ""
        delta = full[len(self.text) :]
        self.text = full
        return delta

    def flush(self) -> str:
        """At the end of generation: the held-back tail of an unfinished character, as U+FFFD."""
        full = self.tokenizer.decode(self.ids)
        delta = full[len(self.text) :]
        self.text = full
        return delta
