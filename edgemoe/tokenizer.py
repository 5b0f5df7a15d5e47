"""Tokenizer from a Hugging Face directory (tokenizer.json via the `tokenizers` library),
with chat templates and a streaming detokenizer that never emits broken UTF-8.

Every file is checked when the tokenizer loads: a value of the wrong kind
(`chat_template: 5`, `eos_token: {"id": 2}`, `eos_token_id: "x"`) is a ModelLoadError
naming the file and the key, not a crash later. Text that is not valid Unicode (lone
surrogates, as Python makes of invalid UTF-8 bytes in a command line argument) is
encoded with U+FFFD in place of each bad code point, as llama.cpp does.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import InvalidArgument, ModelLoadError
from .jsonfile import read_json

SPECIAL_KEYS = ("bos_token", "eos_token")


def clean_text(text: str | bytes) -> str:
    """`text` as valid Unicode: bytes are decoded as UTF-8, and every invalid byte
    (which Python's surrogateescape turns into a lone surrogate such as U+DCFF) and every
    unpaired surrogate (JSON allows "\\ud800") becomes U+FFFD. A high/low surrogate pair
    becomes the character it encodes."""
    if isinstance(text, (bytes, bytearray)):
        return bytes(text).decode("utf-8", "replace")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _token_text(value, key: str, source: Path) -> str | None:
    """Special tokens appear either as plain strings or as {"content": ...} objects."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ModelLoadError(
        f"{source}: {key} must be a string or an object with a string \"content\", got {_short(value)}"
    )


def check_regular(path: Path) -> None:
    """Refuse a directory, named pipe or device where a file is expected: reading a pipe
    would block forever, inside a library that cannot be interrupted."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file")


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, or {} if the file does not exist."""
    if not path.exists():
        return {}
    check_regular(path)
    return read_json(path, ModelLoadError, object_expected="expected a JSON object, got {type}")


def _chat_template(value, source: Path) -> str | None:
    """A chat template is a string, or a list of {"name", "template"} objects (named
    templates, of which "default" is used, else the first)."""
    if value is None or isinstance(value, str):
        return value or None
    bad = f"{source}: chat_template must be a string or a list of {{\"name\": ..., \"template\": ...}} objects"
    if not isinstance(value, list):
        raise ModelLoadError(f"{bad}, got {_short(value)}")
    named = {}
    for entry in value:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("template"), str)):
            raise ModelLoadError(f"{bad}, got an entry {_short(entry)}")
        named[entry["name"]] = entry["template"]
    return named.get("default") or next(iter(named.values()), None)


def _token_ids(value, key: str, source: Path) -> list[int]:
    """An id or a list of ids (generation_config.json's eos_token_id)."""
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ModelLoadError(
            f"{source}: {key} must be a non-negative integer or a list of them, got {_short(value)}"
        )
    return ids


class Tokenizer:
    """Encode, decode and apply the chat template of a model directory."""

    def __init__(self, path: str | Path, eos_token_ids: list[int] | None = None):
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        self.file = tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise ModelLoadError(f"{tok_file}: missing (edgemoe needs a fast-tokenizer tokenizer.json)")
        check_regular(tok_file)
        try:
            self._tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise ModelLoadError(f"{tok_file}: cannot load tokenizer: {_one_line(e)}") from None
        cfg_file, map_file = path / "tokenizer_config.json", path / "special_tokens_map.json"
        cfg, special_map = _read_json(cfg_file), _read_json(map_file)
        texts = {}
        for key in SPECIAL_KEYS:  # tokenizer_config.json wins over special_tokens_map.json
            source = cfg_file if key in cfg else map_file
            texts[key] = _token_text(cfg.get(key, special_map.get(key)), key, source)
        self.bos_token, self.eos_token = texts["bos_token"], texts["eos_token"]
        self.chat_template = _chat_template(cfg.get("chat_template"), cfg_file)
        self.chat_template_source = cfg_file
        jinja = path / "chat_template.jinja"
        if self.chat_template is None and jinja.exists():
            check_regular(jinja)
            try:
                self.chat_template = jinja.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                raise ModelLoadError(f"{jinja}: not valid UTF-8: {e}") from None
            except OSError as e:
                raise ModelLoadError(f"{jinja}: cannot read: {e.strerror or e}") from None
            self.chat_template_source = jinja
        self.eos_ids: set[int] = set(eos_token_ids or [])
        gen_file = path / "generation_config.json"
        gen = _read_json(gen_file).get("eos_token_id")
        if gen is not None:
            self.eos_ids |= set(_token_ids(gen, "eos_token_id", gen_file))
        if self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            self.eos_ids.add(self.token_to_id(self.eos_token))
        self.bos_id = self.token_to_id(self.bos_token) if self.bos_token else None
        self._special_texts = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def max_token_id(self) -> int:
        """The largest id encoding can produce: vocabulary and added tokens, and the
        special tokens the post-processor inserts (which need not be in the vocabulary)."""
        ids = list(self._tok.get_vocab(with_added_tokens=True).values())
        ids += self._tok.encode("x", add_special_tokens=True).ids
        return max(ids, default=-1)

    def check_vocab(self, model_vocab_size: int, source: str) -> None:
        """Refuse a tokenizer that can produce ids the model has no embedding row for
        (tokens added to the tokenizer without resizing the model); `source` names the
        model's config (config.json or manifest.json)."""
        top = self.max_token_id()
        if top >= model_vocab_size:
            raise ModelLoadError(
                f"{self.file}: the tokenizer has {top + 1} token ids (0..{top}) but the model has vocab_size "
                f"{model_vocab_size} ({source}); were tokens added to the tokenizer without resizing the model?"
            )

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str | bytes, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Invalid input is not an error: bytes are decoded as UTF-8
        and lone surrogates (invalid UTF-8 from a command line, "\\ud800" from JSON)
        become U+FFFD, one per bad code point (see `clean_text`)."""
        return self._tok.encode(clean_text(text), add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """Render messages (and OpenAI-style `tools`, if any) with the model's Jinja chat
        template, in a sandbox, as transformers does. The result is valid Unicode: lone
        surrogates in message contents become U+FFFD. A template that fails on the request's
        tools is the request's problem (InvalidArgument); otherwise the model's (ModelLoadError)."""
        if not self.chat_template:
            raise ModelLoadError(f"{self.chat_template_source}: this model has no chat template (no chat_template "
                                 "key, no chat_template.jinja)")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        extra = {"tools": tools} if tools else {}
        try:
            text = env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        # A template is data from the model directory: whatever its code raises is its error.
        except (TemplateError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as e:
            if tools:
                raise InvalidArgument(f"{self.chat_template_source}: chat template failed with tools: "
                                      f"{_one_line(e)}") from None
            raise ModelLoadError(f"{self.chat_template_source}: chat template failed: {_one_line(e)}") from None
        return clean_text(text)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The rendered template already holds any BOS text, so add no specials again.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class StreamingDetokenizer:
    """Turns a growing token list into text deltas.

    Decodes a short window of recent tokens and only emits text once it no longer ends
    in a partial UTF-8 sequence (U+FFFD), so multi-byte characters split across tokens
    come out whole.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0  # window start: tokens already fully emitted before it
        self.read = 0  # tokens up to here have been emitted
        self.text = ""

    def add(self, token: int) -> str:
        """Add one token; returns the newly completed text (possibly empty)."""
        self.tokens.append(token)
        before = self.tok.decode(self.tokens[self.prefix : self.read])
        now = self.tok.decode(self.tokens[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            delta = now[len(before) :]
            self.prefix, self.read = self.read, len(self.tokens)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Emit whatever is left, even an incomplete character."""
        before = self.tok.decode(self.tokens[self.prefix : self.read])
        now = self.tok.decode(self.tokens[self.prefix :])
        delta = now[len(before) :]
        self.prefix = self.read = len(self.tokens)
        self.text += delta
        return delta
