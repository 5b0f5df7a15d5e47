"""Constrained decoding with llguidance: JSON (OpenAI's `response_format`) and tool-call
grammars, applied as a logits processor.

llguidance was chosen by measurement (edgemoe_lab/experiments/grammar_overhead.py,
edgemoe_lab/results/grammar_overhead.md): it reads the tokenizer straight from tokenizer.json
(byte-level BPE and byte-fallback vocabularies alike, no transformers needed at run time)
and adds the least time per token on the CPU.

A `Grammar` is compiled once per request from a grammar string; `Grammar.processor()`
returns a LogitsProcessor that masks every token the grammar forbids. It learns the tokens
that were sampled from the context it is called with (the layering of generate_step:
processors see the prompt plus the tokens so far), so nothing else in the generation
loop needs to know about it. Once the grammar is complete only end-of-sequence tokens are
allowed.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Sequence

import torch

from .errors import InvalidArgument

# Compact JSON as json.dumps writes it. llguidance's default allows any whitespace between
# tokens, on which a weak model can spend its whole budget.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    # Not llguidance.torch: its mask kernel goes through torch.compile (seconds on first use).
    try:
        import llguidance
    except ImportError as e:  # a dependency of edgemoe: only a broken installation lacks it
        raise InvalidArgument(f"constrained decoding needs the llguidance package ({e}); "
                              "reinstall edgemoe with its dependencies") from None
    return llguidance


class GrammarTokenizer:
    """llguidance's view of a model's vocabulary, built once (about a second for a
    150k-token vocabulary) and shared by every request."""

    _lock = threading.Lock()

    def __init__(self, tokenizer, vocab_size: int):
        llg = _llguidance()
        eos = sorted(tokenizer.eos_ids)
        if not eos:
            raise InvalidArgument(f"{tokenizer.file}: the model has no end-of-sequence token, which constrained "
                                  "decoding needs to end its output")
        text = tokenizer.file.read_text(encoding="utf-8")
        try:
            self.llt = llg.LLTokenizer(text, n_vocab=vocab_size, eos_token=eos if len(eos) > 1 else eos[0])
        except BaseException as e:  # its errors, and Rust panics (pyo3's PanicException is a BaseException)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise InvalidArgument(f"{tokenizer.file}: llguidance cannot use this tokenizer: {e}") from None
        self.vocab_size = vocab_size
        self.eos = eos
        self.tokenizer = tokenizer

    def special_token(self, text: str) -> int | None:
        """The id of `text` when it is a single special (added) token, else None."""
        tid = self.tokenizer.token_to_id(text)
        if tid is None:
            return None
        return tid if self.llt.is_special_token(tid) else None

    def literal(self, text: str) -> str:
        """A Lark terminal matching `text`: a special token by its id, other text as a string."""
        tid = self.special_token(text)
        return f"<[{tid}]>" if tid is not None else json.dumps(text)


def json_schema_grammar(schema: dict | None) -> str:
    """A grammar for JSON matching `schema` (None: any JSON object)."""
    llg = _llguidance()
    if schema is None:
        schema = {"type": "object"}
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise InvalidArgument(f"invalid JSON schema: {e}") from None


def lark_grammar(lark: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(lark)


class Grammar:
    """A grammar checked against a vocabulary; make one processor per sequence."""

    def __init__(self, gtok: GrammarTokenizer, grammar: str, what: str = "grammar"):
        llg = _llguidance()
        self.gtok, self.grammar = gtok, grammar
        try:
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, gtok.llt)
        except Exception as e:  # llguidance's own errors (ValueError, RuntimeError) carry its message
            raise InvalidArgument(f"{what}: {e}") from None
        if is_error:
            raise InvalidArgument(f"{what}: {'; '.join(messages)}")

    def processor(self) -> "GrammarProcessor":
        return GrammarProcessor(self)


_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarProcessor:
    """LogitsProcessor: forbidden tokens get -inf. Raises RuntimeError if a sampled token
    was not allowed (only a sampler that ignores the mask could do that)."""

    def __init__(self, grammar: Grammar):
        llg = _llguidance()
        self.matcher = llg.LLMatcher(grammar.gtok.llt, grammar.grammar)
        if self.matcher.is_error():
            raise InvalidArgument(f"grammar: {self.matcher.get_error()}")
        self.vocab_size = grammar.gtok.vocab_size
        self.mask = torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)  # (W,) bit j of word w: token 32w + j
        self.start: int | None = None
        self.seen = 0

    def __call__(self, ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = self.seen = len(ids)
        for token in ids[self.seen :]:
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"token {token} was sampled against the grammar: {self.matcher.get_error()}")
        self.seen = len(ids)
        self.matcher.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.mask.numel() * 4)
        allowed = ((self.mask[:, None] >> _SHIFTS) & 1).view(-1)  # (W * 32,)
        n = min(logits.shape[-1], allowed.shape[0])
        out = torch.full_like(logits, float("-inf"))  # ids past the grammar's vocabulary stay forbidden
        out[:n] = logits[:n].masked_fill(allowed[:n] == 0, float("-inf"))
        return out


def parse_response_format(value: Any) -> dict | None:
    """OpenAI's response_format -> a JSON schema (or {} for any JSON object); None for
    plain text. Raises InvalidArgument naming what is wrong."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise InvalidArgument("'response_format' must be an object with a 'type' of text, json_object or json_schema")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidArgument("'response_format.json_schema' must be an object with a 'name' and a 'schema'")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument("'response_format.json_schema.name' must be a non-empty string")
        if spec.get("strict") is not None and not isinstance(spec.get("strict"), bool):
            raise InvalidArgument("'response_format.json_schema.strict' must be a boolean")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise InvalidArgument("'response_format.json_schema.schema' must be a JSON schema object")
        return schema
    raise InvalidArgument(f"'response_format' type {kind!r} is not supported (text, json_object or json_schema)")
