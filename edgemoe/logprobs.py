"""Log-probabilities in OpenAI's two shapes: the completions API's parallel lists
(tokens, token_logprobs, top_logprobs, text_offset) and the chat API's list of
{"token", "logprob", "bytes", "top_logprobs"} objects.

A token's text is the exact bytes it stands for (a byte-level BPE token may hold part of
a UTF-8 character), read from the vocabulary in tokenizer.json: byte-level pieces
through the GPT-2 byte table, `<0xNN>` byte-fallback pieces as that byte, and Metaspace's
"▁" as a space. Its string is those bytes decoded with U+FFFD for an incomplete
character, as OpenAI does.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Sequence

from .generate import TokenLogprob

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode table (byte-level BPE's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


_BYTE_DECODER = _gpt2_byte_decoder()


def _decoder_kinds(node) -> set[str]:
    if not isinstance(node, dict):
        return set()
    kinds = {node.get("type")}
    for child in node.get("decoders") or []:
        kinds |= _decoder_kinds(child)
    return kinds


class TokenText:
    """Bytes and display strings of token ids, for one tokenizer."""

    def __init__(self, tokenizer):
        try:
            data = json.loads(tokenizer.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        kinds = _decoder_kinds(data.get("decoder"))
        self.byte_level = "ByteLevel" in kinds
        self.byte_fallback = "ByteFallback" in kinds
        self.metaspace = "Metaspace" in kinds or "Replace" in kinds
        self.added = {a["id"]: a["content"] for a in data.get("added_tokens") or []
                      if isinstance(a, dict) and isinstance(a.get("id"), int) and isinstance(a.get("content"), str)}
        vocab = (data.get("model") or {}).get("vocab") or {}
        if isinstance(vocab, dict):  # BPE, WordPiece: {piece: id}
            self.pieces = {i: p for p, i in vocab.items() if isinstance(i, int)}
        else:  # Unigram: [[piece, score], ...]
            self.pieces = {i: e[0] for i, e in enumerate(vocab) if isinstance(e, list) and e and isinstance(e[0], str)}
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, token: int) -> bytes:
        piece = self.pieces.get(token, self.added.get(token))
        if piece is None:  # an id past the tokenizer's vocabulary (a padded embedding): no text
            return b""
        if self.byte_fallback:
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                return bytes([int(m.group(1), 16)])
        if token in self.added:
            return self.added[token].encode()
        if self.byte_level and all(c in _BYTE_DECODER for c in piece):
            return bytes(_BYTE_DECODER[c] for c in piece)
        if self.metaspace:
            piece = piece.replace("\u2581", " ")
        return piece.encode()

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", "replace")


def completion_logprobs(tt: TokenText, entries: Sequence[TokenLogprob | None], tokens: Sequence[int],
                        offset: int = 0) -> dict:
    """The completions API's logprobs object for `tokens` (entries[i] scores tokens[i];
    None for a token nothing predicts, the first of an echoed prompt). text_offset counts
    characters from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    pos = offset
    for token, entry in zip(tokens, entries):
        text = tt.text(token)
        out["tokens"].append(text)
        out["text_offset"].append(pos)
        pos += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(entry.logprob)
        top: dict[str, float] = {}
        for t, lp in entry.top:
            top.setdefault(tt.text(t), lp)  # two ids may share a string: keep the likelier
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(tt: TokenText, entries: Sequence[TokenLogprob]) -> list[dict]:
    """The chat API's logprobs "content" list."""

    def item(token: int, logprob: float) -> dict:
        b = tt.bytes(token)
        return {"token": b.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(b)}

    return [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
