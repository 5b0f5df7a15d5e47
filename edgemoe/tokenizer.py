"""Tokenizer from a Hugging Face directory (tokenizer.json via the `tokenizers` library),
with chat templates and a streaming detokenizer that never emits broken UTF-8."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import ModelLoadError


def _token_text(value) -> str | None:
    """Special tokens appear either as plain strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: invalid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


class Tokenizer:
    """Encode, decode and apply the chat template of a model directory."""

    def __init__(self, path: str | Path, eos_token_ids: list[int] | None = None):
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise ModelLoadError(f"{tok_file}: missing (edgemoe needs a fast-tokenizer tokenizer.json)")
        try:
            self._tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise ModelLoadError(f"{tok_file}: cannot load tokenizer: {e}") from None
        cfg = _read_json(path / "tokenizer_config.json")
        special = {**_read_json(path / "special_tokens_map.json"), **cfg}
        self.bos_token = _token_text(special.get("bos_token"))
        self.eos_token = _token_text(special.get("eos_token"))
        self.chat_template = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        jinja = path / "chat_template.jinja"
        if self.chat_template is None and jinja.exists():
            self.chat_template = jinja.read_text()
        self.eos_ids: set[int] = set(eos_token_ids or [])
        gen = _read_json(path / "generation_config.json").get("eos_token_id")
        if gen is not None:
            self.eos_ids |= set(gen if isinstance(gen, list) else [gen])
        if self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            self.eos_ids.add(self.token_to_id(self.eos_token))
        self.bos_id = self.token_to_id(self.bos_token) if self.bos_token else None
        self._special_texts = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's Jinja chat template, as transformers does."""
        if not self.chat_template:
            raise ModelLoadError("this model has no chat template (tokenizer_config.json has no chat_template)")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise ModelLoadError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The rendered template already holds any BOS text, so add no specials again.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)


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
