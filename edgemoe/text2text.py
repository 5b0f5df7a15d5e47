"""Text-to-text generation through the Engine (edgemoe.load on an encoder-decoder model:
Switch Transformers, NLLB-MoE).

The prompt is the source: tokenized as the model's tokenizer does (a T5 tokenizer ends it
with </s>), encoded once, and the completion is the decoded target (edgemoe.seq2seq).
Sampling options, logits processors, stop strings, max_tokens, seed, log-probabilities
and statistics (with the offloaded runtime's) are those of decoder-only generation: the
target's tokens go through `generate.stream_generate` like any other. Logits processors
(repetition and presence penalties, grammars) see the target so far, starting with the
decoder start token, as transformers applies them to the decoder's input ids.

What cannot apply is refused by name rather than ignored:
- `cache` (a PromptCache reused across calls): the decoder attends to a new source on
  every call, so no prefix of an earlier call can be kept;
- `prompt_logprobs` / echo scoring: a source has no likelihood under the model (its
  target does: `edgemoe eval` scores targets, seq2seq.pair_loss);
- `parallel` > 1: the batch scheduler's rows continue decoder-only sequences; an
  encoder-decoder Engine runs one sequence at a time, calls from several threads (the
  server's requests) taking turns for whole sequences.

Languages (translation models, NLLB-MoE): `target_lang` makes the target start with
that language code after the decoder start token, read in a forward of its own as
transformers' generate reads its forced_bos_token_id; the code is part of the decoder
prompt, not a generated token. `source_lang` puts its code in place of the language the
tokenizer's template (tokenizer.json's post_processor, "single") was saved with:
[code] text </s> in the form transformers writes now, text </s> [code] in the legacy one
(legacy_behaviour). A model whose tokenizer puts no language code in its sources (Switch
Transformers) refuses both by name, as do decoder-only models (`refuse_languages`).

Context: `ctx_size` bounds the source and the target separately (the decoder's KV cache
and the cross-attention keys and values each hold up to ctx_size positions): a source
of up to ctx_size tokens, and up to ctx_size + 1 - len(decoder prompt) target tokens
(the last generated token is never fed back) whatever the source's length; the decoder
prompt is the decoder start token, and the target language code with `target_lang`.
"""

from __future__ import annotations

import json
import threading
from typing import Callable, Iterator, Sequence

from .errors import ContextLengthError, EdgeMoEError, InvalidArgument
from .generate import GenerationResponse, one_at_a_time, stream_generate
from .seq2seq import generate_step

POLL_S = 0.2  # how often a call waiting for the model checks its `abort`


def refuse_parallel(parallel: int) -> None:
    """Encoder-decoder models decode one sequence at a time (see the module notes)."""
    if parallel > 1:
        raise InvalidArgument(f"parallel {parallel}: an encoder-decoder model decodes one sequence at a time "
                              "(batched decode steps continue decoder-only sequences); use parallel 1")


def refuse_languages(options, model_type: str) -> None:
    """A decoder-only model takes no language codes (`options`: GenerateOptions)."""
    for name in ("target_lang", "source_lang"):
        if getattr(options, name) is not None:
            raise InvalidArgument(f"{name}: {model_type} is a decoder-only model; language codes are for "
                                  "encoder-decoder translation models (NLLB-MoE)")


def source_template(tokenizer_json: dict) -> tuple[list, dict]:
    """The template a tokenizer.json applies to one sequence: (its "single" items, its
    special tokens {token: {"ids": [...]}}), or ([], {}) when it has no TemplateProcessing
    post-processor (also as one step of a "Sequence" of them)."""
    proc = tokenizer_json.get("post_processor") or {}
    steps = proc.get("processors", []) if proc.get("type") == "Sequence" else [proc]
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
            return list(step.get("single") or []), dict(step.get("special_tokens") or {})
    return [], {}


def is_seq2seq_dir(path) -> bool:
    """Whether the model directory `path` (Hugging Face or converted: both hold its
    config.json) is of an encoder-decoder family, from its config alone (the server
    decides its slots before loading). False when it cannot tell: loading reports why."""
    import json
    from pathlib import Path

    from .models import FAMILIES, get_family

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        model_type = config.get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    if model_type not in FAMILIES:
        return False
    return bool(getattr(get_family(model_type).ModelArgs, "is_encoder_decoder", False))


class Text2Text:
    """The encoder-decoder side of one Engine: context checks and streaming. `lock` is
    held for a whole sequence, so calls from several threads take turns; `step` while the
    model computes one response (close() waits for it, as the batch scheduler's does)."""

    def __init__(self, engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.step = threading.Lock()
        self.closed = False
        self.start = engine.model.args.decoder_start_token_id
        self._template: tuple | None = None  # read on first use (languages): see _languages

    # ------------------------------------------------------------- checks

    def max_target(self, decoder_tokens: int = 1) -> int:
        """The most target tokens a call may generate after a decoder prompt of
        `decoder_tokens` (2 with a target language): the decoder's cache holds the
        decoder prompt and every generated token but the last."""
        return self.engine.ctx_size - decoder_tokens + 1

    def check_context(self, source_tokens: int, max_tokens: int, decoder_tokens: int = 1) -> None:
        """Raise ContextLengthError unless the source and max_tokens each fit the context."""
        ctx, most = self.engine.ctx_size, self.max_target(decoder_tokens)
        if source_tokens > ctx:
            raise ContextLengthError(
                f"the prompt (the source, {source_tokens} tokens) is longer than the context size of {ctx} tokens; "
                "shorten it or raise the context size (--ctx-size / ctx_size)")
        if max_tokens > most:
            raise ContextLengthError(
                f"max_tokens ({max_tokens}) is more than the {most} target tokens the context size of "
                f"{ctx} holds; lower max_tokens or raise the context size (--ctx-size / ctx_size)")

    def room(self, source_tokens: int, default: int, decoder_tokens: int = 1) -> int:
        """Default max_tokens: `default`, or fewer if the context is short (0 when the
        source does not fit, so that the caller's check reports it)."""
        return 0 if source_tokens > self.engine.ctx_size else min(default, self.max_target(decoder_tokens))

    @staticmethod
    def check_options(cache, prompt_logprobs: bool) -> None:
        if cache is not None:
            raise InvalidArgument("cache: an encoder-decoder model encodes a new source on every call, so a prompt "
                                  "cache cannot be reused; call without one")
        if prompt_logprobs:
            raise InvalidArgument("prompt_logprobs (echo with log-probabilities): an encoder-decoder model gives "
                                  "no likelihood to its source (edgemoe eval scores targets)")

    # ------------------------------------------------------------- languages

    def _languages(self) -> tuple[list, dict, int | None, dict[str, int]]:
        """From tokenizer.json: its source template (source_template); the index in it of
        the language code, the one special token that is neither the tokenizer's BOS nor
        EOS (None when there is none, or more than one); and its special tokens other than
        BOS and EOS, {text: id}."""
        if self._template is None:
            tok = self.engine.tokenizer
            try:
                data = json.loads(tok.file.read_bytes().decode("utf-8"))
                single, specials = source_template(data)
                special = {t["content"]: t["id"] for t in data.get("added_tokens") or () if t.get("special")
                           and t["content"] not in (tok.eos_token, tok.bos_token)}
            except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
                raise EdgeMoEError(f"{tok.file}: cannot read the tokenizer's template: {e}") from None
            slots = [i for i, item in enumerate(single) if isinstance(item, dict) and "SpecialToken" in item
                     and item["SpecialToken"].get("id") not in (tok.eos_token, tok.bos_token)]
            self._template = (single, specials, slots[0] if len(slots) == 1 else None, special)
        return self._template

    def language_id(self, code, option: str) -> int:
        """The token id of the language code `code` given as `option`; InvalidArgument
        naming both unless this model's tokenizer marks languages and `code` is one of its
        special tokens."""
        tok = self.engine.tokenizer
        if self._languages()[2] is None:
            raise InvalidArgument(f"{option}: {self.engine.model.args.model_type} takes no language codes (its "
                                  f"tokenizer, {tok.file}, puts none in a source); they are for translation models "
                                  "such as NLLB-MoE")
        if not isinstance(code, str):
            raise InvalidArgument(f"{option} must be a language code (a string such as \"deu_Latn\"), got {code!r}")
        token = tok.token_to_id(code)
        if token is None:
            raise InvalidArgument(f"{option} {code!r}: not one token of this model's vocabulary ({tok.file}); "
                                  "language codes look like \"deu_Latn\"")
        if code not in self._languages()[3]:
            raise InvalidArgument(f"{option} {code!r}: a word of this model's vocabulary, not a language code "
                                  f"(language codes are special tokens of {tok.file}, such as \"deu_Latn\")")
        return token

    def decoder_prompt(self, target_lang: str | None) -> list[int]:
        """What the decoder reads before the first target token: the decoder start token,
        then the target language code if one is given (read in a forward of its own, as
        transformers reads its forced_bos_token_id: seq2seq.generate_step's `forced`)."""
        if target_lang is None:
            return [self.start]
        return [self.start, self.language_id(target_lang, "target_lang")]

    def source(self, prompt: str | Sequence[int], source_lang: str | None) -> list[int]:
        """The source's token ids (Engine.tokenize's); with `source_lang`, its code in
        place of the language code where the tokenizer's template puts one (the first
        token in transformers' current form, the last in the legacy one). A text prompt
        then reads as transformers' NllbTokenizer(src_lang=source_lang) encodes it; ids
        (the server tokenizes its prompts) must hold a language code in that place."""
        ids = self.engine.tokenize(prompt)
        if source_lang is None:
            return ids
        code = self.language_id(source_lang, "source_lang")
        single, specials, slot, special = self._languages()
        sequence = next((i for i, item in enumerate(single) if "Sequence" in item), len(single))

        def width(items) -> int:
            return sum(len(specials[item["SpecialToken"]["id"]]["ids"]) for item in items)

        at = width(single[:slot]) if slot < sequence else len(ids) - width(single[slot:])
        if not 0 <= at < len(ids) or ids[at] not in special.values():
            raise InvalidArgument(f"source_lang: the prompt's token ids hold no language code where "
                                  f"{self.engine.tokenizer.file} puts one (token {at}); give a text prompt, or "
                                  "ids with a language code there")
        return ids[:at] + [code] + ids[at + 1:]

    # ------------------------------------------------------------- running

    def close(self) -> None:
        """Stop for good (Engine.close): waits for the step in progress; a running or
        waiting sequence then ends with an error, and none can start."""
        with self.step:
            self.closed = True

    def stream(self, call, abort: Callable[[], None] | None = None) -> Iterator[GenerationResponse]:
        """The responses of a checked call (api._Call), computed while holding `lock`
        (waiting for it runs `abort` every POLL_S seconds); closing the iterator frees it."""
        while not self.lock.acquire(timeout=POLL_S):
            if self.closed:
                raise EdgeMoEError("the engine is closed")
            if abort is not None:
                abort()
        try:
            if self.closed:
                raise EdgeMoEError("the engine is closed")
            yield from one_at_a_time(self._run(call), self.step, self._check_open)
        finally:
            self.lock.release()

    def _check_open(self) -> None:
        if self.closed:
            raise EdgeMoEError("the engine was closed before this sequence finished")

    def _run(self, call) -> Iterator[GenerationResponse]:
        engine = self.engine
        model, cache = engine.model, engine._cache.layers  # a Seq2SeqCache of ctx_size positions
        if engine.provider is not None:
            engine.provider.reset_stats()  # statistics describe this request only
        steps = generate_step(model, call.ids, call.sampler, call.procs, call.max_tokens, cache,
                              decoder_prompt=call.decoder_prompt[:1], forced=call.decoder_prompt[1:],
                              onednn=engine.onednn, logprobs=call.logprobs is not None)
        per_position = model.kv_bytes_per_token() // 2  # self-attention (target) or cross-attention (source) K/V
        responses = stream_generate(model, engine.tokenizer, call.ids, call.max_tokens, call.sampler, call.procs,
                                    call.stop, call.ignore_eos, None, onednn=engine.onednn, logprobs=call.logprobs,
                                    steps=steps, kv_stats=lambda: (cache.capacity, 0))
        for r in responses:
            if r.finish_reason is not None:  # the positions filled: source (cross K/V) and target (self K/V)
                r.stats.kv_used_bytes = (cache.source_len + cache.offset) * per_position
            yield r

