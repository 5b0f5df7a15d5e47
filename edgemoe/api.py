"""Python API: `edgemoe.load(path)` returns an `Engine` with `generate` and `stream`.

    >>> import edgemoe
    >>> engine = edgemoe.load()                      # the bundled model, all in RAM
    >>> print(engine.generate("def add(a, b):", max_tokens=32).text)
    >>> engine = edgemoe.load("out/", memory="300MB")  # a converted model, experts offloaded
    >>> engine = edgemoe.load(parallel=4)             # four KV caches: four sequences per decode step
    >>> [r.text for r in engine.generate_batch(["def add(", "class Point", "import os"], max_tokens=32)]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .batching import BatchScheduler, SequenceStream
from .cpu import prefill_onednn
from .errors import ContextLengthError, InvalidArgument, ModelLoadError
from .generate import (GenerationResponse, GenerationStats, PromptCache, PromptScorer, one_at_a_time, provider_of,
                       stream_generate)
from .models.base import Transformer
from .models.moe import set_adaptive_gating
from .options import GenerateOptions
from .sample import make_logits_processors, make_sampler
from .runtime.config import RuntimeConfig, check_parallel, check_threads, load_doc, options_doc
from .seq2seq import is_seq2seq
from .store.manifest import MANIFEST_NAME, is_converted
from .text2text import Text2Text, refuse_languages, refuse_parallel
from .tokenizer import Tokenizer



def default_model_dir() -> Path:
    from . import assets

    if not Path(assets.MODEL_DIR, "config.json").exists():
        raise ModelLoadError(f"{assets.MODEL_DIR}: the bundled model is missing from this installation")
    return Path(assets.MODEL_DIR)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }


DEFAULT_MAX_TOKENS = 256


@dataclass
class _Call:
    """One checked call of Engine.stream: what running it needs."""

    ids: list[int]
    max_tokens: int
    sampler: object
    procs: list
    stop: list[str]
    ignore_eos: bool
    cache: PromptCache | None
    logprobs: int | None
    prompt_logprobs: bool
    decoder_prompt: list[int] | None = None  # an encoder-decoder's: decoder start (+ target language)


MAX_TOP_LOGPROBS = 20  # top alternatives per token (OpenAI's chat limit)


class Engine:
    """A loaded model with its tokenizer. Obtain one with `edgemoe.load`.

    `ctx_size` is the most tokens (prompt plus generated) one sequence may hold; the
    engine's KV cache is allocated for that many positions once, inside the memory budget.

    `parallel` sequences can be decoded together (`generate_batch`, or every call once
    `start_batching` has run, as the server does): each has its own KV cache, and the
    budget holds all of them (edgemoe.load(parallel=N)). Without batching an Engine runs
    one call at a time; with it, calls from several threads share decode steps.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, path: Path, info: dict | None = None,
                 ctx_size: int | None = None, onednn: bool = True, parallel: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.info = info or {}  # how it was loaded: kind, dtype, memory budget, ...
        self.on_close: list = []  # callables run by close() (e.g. saving a recorded routing trace)
        self.ctx_size = ctx_size or model.args.max_position_embeddings
        self.onednn = onednn
        self.parallel = check_parallel(parallel)
        self._cache = PromptCache(model, self.ctx_size)  # used when a call brings none
        self._scheduler: BatchScheduler | None = None
        # An encoder-decoder model runs text-to-text: the prompt is the source (edgemoe.text2text).
        self.text2text = Text2Text(self) if is_seq2seq(model) else None

    @property
    def provider(self):
        return provider_of(self.model)

    @property
    def vocab_limit(self) -> int:
        """Token ids must be below this: the embedding's row count."""
        return self.model.args.vocab_size

    @property
    def scheduler(self) -> BatchScheduler:
        """The batch scheduler (edgemoe.batching) of `parallel` slots, made on first use; the
        engine's own KV cache is its first slot. Once it exists, every call without an
        explicit cache goes through it."""
        if self.text2text is not None:
            raise InvalidArgument("an encoder-decoder model has no batch scheduler: it decodes one sequence at a time")
        if self._scheduler is None:
            caches = [self._cache] + [PromptCache(self.model, self.ctx_size) for _ in range(self.parallel - 1)]
            self._scheduler = BatchScheduler(self.model, caches, self.onednn)
        return self._scheduler

    def start_batching(self) -> None:
        """Run the batch scheduler on a background thread: from now on calls without an
        explicit cache, from any thread, queue for one of the `parallel` slots and share
        decode steps with the others (the server does this). Idempotent; close() stops it.
        An encoder-decoder model has no scheduler: calls from any thread take turns, one
        whole sequence at a time (edgemoe.text2text)."""
        if self.text2text is not None:
            return
        self.scheduler.start()

    def new_cache(self) -> PromptCache:
        """A KV cache that can be passed to successive calls to reuse a shared prefix. Each
        one holds up to ctx_size positions; only the engine's own cache is counted in the
        memory budget."""
        return PromptCache(self.model, self.ctx_size)

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (text, or ids that are checked against the vocabulary)."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int)
                        or not 0 <= t < self.vocab_limit), None)
            if bad is not None:
                raise InvalidArgument(f"prompt token id {bad!r} is not an id of this model's vocabulary "
                                      f"(0 to {self.vocab_limit - 1})")
        if not ids:
            raise InvalidArgument("the prompt is empty (no tokens)")
        return ids

    def check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ContextLengthError unless prompt + max_tokens fit the context size (an
        encoder-decoder model: the source and the target each fit it)."""
        if self.text2text is not None:
            return self.text2text.check_context(prompt_tokens, max_tokens)
        if prompt_tokens + max_tokens > self.ctx_size:
            raise ContextLengthError(
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is more than the context "
                f"size of {self.ctx_size} tokens; shorten the prompt, lower max_tokens, or raise the context "
                "size (--ctx-size / ctx_size, up to the model's maximum positions)")

    def room(self, prompt_tokens: int) -> int:
        """Default max_tokens for a prompt: DEFAULT_MAX_TOKENS, or fewer if the context is short."""
        if self.text2text is not None:
            return self.text2text.room(prompt_tokens, DEFAULT_MAX_TOKENS)
        return min(DEFAULT_MAX_TOKENS, self.ctx_size - prompt_tokens)

    def stream(self, prompt: str | Sequence[int], *, abort=None, **options) -> Iterator[GenerationResponse]:
        """Return an iterator of responses with text deltas; the last one has finish_reason
        and stats. Every option (below; edgemoe.options.GenerateOptions) is checked here,
        before anything runs: bad values raise InvalidArgument, and a prompt plus max_tokens
        beyond the context size raises ContextLengthError.

        Once the batch scheduler exists (start_batching, generate_batch), a call without a
        cache is queued for a slot and decoded together with the others; `abort`, if given,
        is called about every 0.2 s while it waits for a slot or a token and may raise to
        give up (the server stops a request whose client left). Closing the iterator frees
        the slot.

        Options (keywords):
        """
        call = self._prepare(prompt, GenerateOptions.of("Engine.stream", options))
        if self.text2text is not None:
            return self.text2text.stream(call, abort)
        if call.cache is None and self._scheduler is not None:
            return self._submit(call, abort)
        return self._run_alone(call)

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], **options) -> list["Completion"]:
        """Generate for several prompts together: up to `parallel` of them (edgemoe.load's
        option; with 1 they run one after another) share every decode step, the others wait
        for a free slot. Same options as `stream`, applied to each prompt (no cache); every
        prompt is checked before any runs. Returns one Completion per prompt, in order.

        Each prompt gets the tokens it gets run alone through the scheduler: exactly for
        bf16 models (their decode steps use edgemoe.rowmm's kernel, which computes each row
        the same way whatever the batch), up to the rounding of torch's batched matmuls
        otherwise. `generate` without the scheduler decodes on torch's kernels, which round
        bf16 differently, so a near-tie can go the other way there."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise InvalidArgument("generate_batch takes a list of prompts (strings or lists of token ids)")
        o = GenerateOptions.of("Engine.generate_batch", options)
        if o.cache is not None:
            raise InvalidArgument("generate_batch runs its prompts in the engine's slots; it takes no cache")
        calls = [self._prepare(p, o) for p in prompts]
        if self.text2text is not None:  # one after another
            return [self._collect(self.text2text.stream(call)) for call in calls]
        streams = []
        try:
            streams = [self._submit(call, None) for call in calls]
            return [self._collect(s) for s in streams]
        finally:
            for s in streams:
                s.close()

    def _prepare(self, prompt: str | Sequence[int], o: GenerateOptions) -> "_Call":
        """Check every option of a call (see `stream`) and build what running it needs."""
        t2t, decoder = self.text2text, None
        if t2t is None:
            refuse_languages(o, self.model.args.model_type)
            ids = self.tokenize(prompt)
        else:  # the prompt is the source
            decoder = t2t.decoder_prompt(o.target_lang)
            ids = t2t.source(prompt, o.source_lang)
        max_tokens, logprobs, prompt_logprobs, cache = o.max_tokens, o.logprobs, o.prompt_logprobs, o.cache
        if not isinstance(prompt_logprobs, bool):
            raise InvalidArgument(f"prompt_logprobs must be True or False, got {prompt_logprobs!r}")
        if t2t is not None:
            t2t.check_options(cache, prompt_logprobs)
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidArgument(f"logprobs must be None or an integer from 0 to {MAX_TOP_LOGPROBS}, got {logprobs!r}")
        min_tokens = 0 if prompt_logprobs else 1
        if max_tokens is None:  # an encoder-decoder's decoder prompt takes its room in the target's context
            max_tokens = self.room(len(ids)) if t2t is None else t2t.room(len(ids), DEFAULT_MAX_TOKENS, len(decoder))
            max_tokens = max(max_tokens, 1)  # no room: the check below says why
        elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < min_tokens:
            raise InvalidArgument(f"max_tokens must be an integer >= {min_tokens}, got {max_tokens!r}")
        if t2t is None:
            self.check_context(len(ids), max_tokens)
        else:
            t2t.check_context(len(ids), max_tokens, len(decoder))
        sampler = make_sampler(o.temperature, o.top_p, o.top_k, o.min_p, o.seed)
        procs = make_logits_processors(o.repetition_penalty, presence_penalty=o.presence_penalty,
                                       frequency_penalty=o.frequency_penalty, logit_bias=o.logit_bias,
                                       vocab_size=self.vocab_limit)
        if not all(callable(p) for p in o.logits_processors):
            raise InvalidArgument("logits_processors must be callables (context ids, logits) -> logits")
        procs += list(o.logits_processors)
        stop = [o.stop] if isinstance(o.stop, str) else list(o.stop)
        if not all(isinstance(s, str) for s in stop):
            raise InvalidArgument("stop must be a string or a list of strings")
        if cache is not None and cache.capacity is not None and cache.capacity < len(ids) + max_tokens:
            raise ContextLengthError(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) does not fit "
                                     f"the given cache of {cache.capacity} positions")
        return _Call(ids, max_tokens, sampler, procs, stop, o.ignore_eos, cache, logprobs, prompt_logprobs, decoder)

    def _run_alone(self, call: "_Call") -> Iterator[GenerationResponse]:
        cache = call.cache
        if cache is None:
            cache = self._cache
            cache.clear()  # a fresh sequence; reusing a prefix across calls takes an explicit cache
        if self.provider is not None:
            self.provider.reset_stats()  # statistics describe this request only
        responses = stream_generate(self.model, self.tokenizer, call.ids, call.max_tokens, call.sampler, call.procs,
                                    call.stop, call.ignore_eos, cache, onednn=self.onednn, logprobs=call.logprobs,
                                    prompt_logprobs=call.prompt_logprobs)
        if self._scheduler is not None:  # its thread may be computing: take turns with it, token by token
            return one_at_a_time(responses, self._scheduler.model_lock)
        return responses

    def _submit(self, call: "_Call", abort) -> SequenceStream:
        """Queue a call on the batch scheduler; its responses as stream_generate gives them.
        (Provider statistics are not reset: they cover every sequence since the last reset.)"""
        scorer = PromptScorer(call.ids, call.logprobs or 0) if call.prompt_logprobs else None
        seq = self.scheduler.submit(call.ids, call.sampler, call.procs, call.max_tokens, call.logprobs is not None,
                                    () if call.ignore_eos else self.tokenizer.eos_ids, scorer)
        responses = stream_generate(self.model, self.tokenizer, call.ids, call.max_tokens, call.sampler, call.procs,
                                    call.stop, call.ignore_eos, None, onednn=self.onednn, logprobs=call.logprobs,
                                    prompt_logprobs=call.prompt_logprobs, steps=seq.tokens(abort), scorer=scorer,
                                    kv_stats=seq.kv_stats)
        return SequenceStream(responses, seq)

    @staticmethod
    def _collect(responses: Iterator[GenerationResponse]) -> "Completion":
        parts, ids, last = [], [], None
        for r in responses:
            parts.append(r.text)
            if r.token is not None:
                ids.append(r.token)
            last = r
        return Completion("".join(parts), ids, last.finish_reason, last.stats)

    def generate(self, prompt: str | Sequence[int], **kwargs) -> Completion:
        """Generate to completion; same options as `stream`. `token_ids` holds the
        generated ids, without the EOS token that ended generation."""
        return self._collect(self.stream(prompt, **kwargs))

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def chat(self, messages: list[dict], **kwargs) -> Completion:
        """Generate an assistant reply to a list of {"role", "content"} messages."""
        return self.generate(self.chat_prompt(messages), **kwargs)

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()  # running sequences end; nothing computes after this
        if self.text2text is not None:
            self.text2text.close()  # the same for an encoder-decoder's one sequence
        callbacks, self.on_close = self.on_close, []
        for fn in callbacks:
            fn()
        if self.provider is not None:
            self.provider.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Below this many weight bytes touched per decoded token, one thread is faster: splitting
# such small matmuls costs more than it saves, and on a busy 2-core machine OpenMP threads
# stall at barriers (measured 5-8x slower decode with 2 threads on the bundled model).
SMALL_MODEL_BYTES = 64 * 1000**2
_DEFAULT_THREADS = torch.get_num_threads()


def decode_bytes_per_token(model: Transformer) -> int:
    """Approximate weight bytes one decode step reads: resident matrices (not the embedding
    lookup, unless it doubles as the LM head) plus top-k routed experts per MoE layer.
    Resident layers quantized to int8/int4 hold their weights as buffers: counted too."""
    args = model.args
    params = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    if not args.tie_word_embeddings:
        params -= model.embed.weight.nbytes
    elem = model.embed.weight.element_size()
    matrices = 3 if getattr(args, "expert_gated", True) else 2  # ungated experts: w1 and down only
    expert = matrices * args.hidden_size * args.expert_dim * elem
    return params + len(args.moe_layers()) * args.top_k * expert


def set_threads(threads: int | None, model: Transformer | None = None, name: str = "threads") -> int:
    """Apply a thread count to torch's intra-op pool and return the count in effect.

    None keeps torch's default, except for a small model given as `model` (under
    SMALL_MODEL_BYTES read per token), which gets one thread: more only adds contention.
    `name` is what an error calls the option (e.g. "--threads")."""
    threads = check_threads(threads, name)
    if threads is None:
        small = model is not None and decode_bytes_per_token(model) < SMALL_MODEL_BYTES
        torch.set_num_threads(1 if small else _DEFAULT_THREADS)
    else:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def load(path: str | Path | None = None, *, config: RuntimeConfig | None = None, **options) -> Engine:
    if config is None:
        config = RuntimeConfig.from_options(**options)
    elif not isinstance(config, RuntimeConfig):
        raise InvalidArgument(f"config must be an edgemoe.runtime.config.RuntimeConfig, got {config!r}")
    elif options:
        raise InvalidArgument(f"give edgemoe.load either config= or options ({', '.join(sorted(options))}), not both")
    if path is None:
        path = default_model_dir()
    else:
        from .hub import resolve_model

        path = resolve_model(path)  # an existing path, or a hub id ("ORG/NAME") downloaded into the hub cache
    parallel = config.parallel
    if not path.exists():
        from .store.convert import interrupted

        hidden = interrupted(path)
        if hidden is not None:
            raise ModelLoadError(f"{path}: missing: a conversion to it was killed while replacing it, and the previous "
                                 f"model is in {hidden}; the next 'edgemoe convert ... {path}' puts it back")
    if is_converted(path):
        from .runtime.loading import load_converted

        model, info = load_converted(path, config)
    else:
        model, info = _load_in_ram(path, config)
    try:
        tokenizer = Tokenizer(path, eos_token_ids=model.args.eos_ids)
        tokenizer.check_vocab(model.args.vocab_size, str(path / (MANIFEST_NAME if info["kind"] == "converted" else "config.json")))
        if is_seq2seq(model):
            refuse_parallel(parallel)
        info["threads"] = set_threads(config.threads, model)
        if config.adaptive_gating is not None:
            set_adaptive_gating(model, config.adaptive_gating)
            info["adaptive_gating"] = config.adaptive_gating
    except BaseException:
        provider = provider_of(model)
        if provider is not None:
            provider.close()  # stop loader threads and close the store before giving up
        raise
    return Engine(model, tokenizer, path, info, ctx_size=info["ctx_size"], onednn=info["onednn"], parallel=parallel)


load.__doc__ = load_doc()
Engine.stream.__doc__ = Engine.stream.__doc__.rstrip(" ") + options_doc(GenerateOptions, " " * 8) + "\n"


def _load_in_ram(path: Path, config: RuntimeConfig) -> tuple[Transformer, dict]:
    """A Hugging Face directory loaded into RAM (with config.plan: every expert quantized
    to its planned format), and the facts of the load."""
    if config.offload_options():
        raise ModelLoadError(
            f"{path}: memory budgets and runtime options need a converted model; run 'edgemoe convert {path} OUT_DIR' first"
        )
    from .runtime.loading import check_ctx_size

    info: dict = {"kind": "hf"}
    if config.plan is not None:
        from .bitwidth.apply import load_planned, planned_bytes

        model, ckpt, formats = load_planned(path, config.plan, config.dtype)
        counts: dict[str, int] = {}
        for f in formats.values():
            counts[f] = counts.get(f, 0) + 1
        info = {"kind": "hf+plan", "plan": str(config.plan), "formats": counts,
                "expert_bytes": planned_bytes(model, ckpt, formats)}
    else:
        from .checkpoint import load_hf

        model, _ = load_hf(path, config.dtype)
    dtype = next(model.parameters()).dtype
    info["dtype"] = str(dtype).removeprefix("torch.")
    ctx_size = check_ctx_size(config.ctx_size, model.args.max_position_embeddings, str(path))
    weight_bytes = sum(p.nbytes for p in model.parameters()) + provider_of(model).expert_bytes()
    info["onednn"] = prefill_onednn(config.onednn, dtype, weight_bytes)
    info["ctx_size"] = ctx_size
    info["kv_bytes"] = config.parallel * ctx_size * model.kv_bytes_per_token()  # one KV cache per slot
    info["parallel"] = config.parallel
    return model, info
