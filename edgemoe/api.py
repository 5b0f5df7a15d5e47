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

from .batching import BatchScheduler, SequenceStream, check_parallel
from .cpu import prefill_onednn
from .errors import ContextLengthError, InvalidArgument, ModelLoadError
from .generate import GenerationResponse, GenerationStats, PromptCache, PromptScorer, provider_of, stream_generate
from .models.base import Transformer
from .models.moe import set_adaptive_gating
from .sample import make_logits_processors, make_sampler
from .store.manifest import MANIFEST_NAME, is_converted
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


def _one_at_a_time(responses: Iterator, lock) -> Iterator:
    """The responses, each computed while holding `lock` (the batch scheduler's model lock)."""
    try:
        while True:
            with lock:
                r = next(responses, None)
            if r is None:
                return
            yield r
    finally:
        responses.close()


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
        if self._scheduler is None:
            caches = [self._cache] + [PromptCache(self.model, self.ctx_size) for _ in range(self.parallel - 1)]
            self._scheduler = BatchScheduler(self.model, caches, self.onednn)
        return self._scheduler

    def start_batching(self) -> None:
        """Run the batch scheduler on a background thread: from now on calls without an
        explicit cache, from any thread, queue for one of the `parallel` slots and share
        decode steps with the others (the server does this). Idempotent; close() stops it."""
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
        """Raise ContextLengthError unless prompt + max_tokens fit the context size."""
        if prompt_tokens + max_tokens > self.ctx_size:
            raise ContextLengthError(
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is more than the context "
                f"size of {self.ctx_size} tokens; shorten the prompt, lower max_tokens, or raise the context "
                "size (--ctx-size / ctx_size, up to the model's maximum positions)")

    def room(self, prompt_tokens: int) -> int:
        """Default max_tokens for a prompt: DEFAULT_MAX_TOKENS, or fewer if the context is short."""
        return min(DEFAULT_MAX_TOKENS, self.ctx_size - prompt_tokens)

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        cache: PromptCache | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        logprobs: int | None = None,
        prompt_logprobs: bool = False,
        logits_processors: Sequence = (),
        abort=None,
    ) -> Iterator[GenerationResponse]:
        """Return an iterator of responses with text deltas; the last one has finish_reason
        and stats. Every option is checked here, before anything runs: bad values raise
        InvalidArgument, and a prompt plus max_tokens beyond the context size raises
        ContextLengthError. max_tokens None means 256, or fewer if the context is short.

        presence_penalty, frequency_penalty: OpenAI's penalties (-2 to 2) over generated tokens.
        logit_bias: {token id: bias from -100 to 100} added to the logits.
        logprobs: None, or how many top alternatives (0 to 20) to report with each token's
        log-probability (GenerationResponse.logprobs; the model's distribution, before
        penalties and sampling settings).
        prompt_logprobs: also score the prompt (the first response's prompt_logprobs); then
        max_tokens may be 0, which only scores.
        logits_processors: extra callables (context ids, logits) -> logits, applied last
        (constrained decoding, ...); each is used for this one call.
        cache: a PromptCache (new_cache) whose prefix shared with the prompt is reused; the
        call then runs alone, outside the batch scheduler.

        Once the batch scheduler exists (start_batching, generate_batch), a call without a
        cache is queued for a slot and decoded together with the others; `abort`, if given,
        is called about every 0.2 s while it waits for a slot or a token and may raise to
        give up (the server stops a request whose client left). Closing the iterator frees
        the slot.
        """
        call = self._prepare(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                             ignore_eos=ignore_eos, cache=cache, presence_penalty=presence_penalty,
                             frequency_penalty=frequency_penalty, logit_bias=logit_bias, logprobs=logprobs,
                             prompt_logprobs=prompt_logprobs, logits_processors=logits_processors)
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
        if options.get("cache") is not None:
            raise InvalidArgument("generate_batch runs its prompts in the engine's slots; it takes no cache")
        calls = [self._prepare(p, **options) for p in prompts]
        streams = []
        try:
            streams = [self._submit(call, None) for call in calls]
            return [self._collect(s) for s in streams]
        finally:
            for s in streams:
                s.close()

    def _prepare(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        cache: PromptCache | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        logprobs: int | None = None,
        prompt_logprobs: bool = False,
        logits_processors: Sequence = (),
    ) -> "_Call":
        """Check every option of a call (see `stream`) and build what running it needs."""
        ids = self.tokenize(prompt)
        if not isinstance(prompt_logprobs, bool):
            raise InvalidArgument(f"prompt_logprobs must be True or False, got {prompt_logprobs!r}")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidArgument(f"logprobs must be None or an integer from 0 to {MAX_TOP_LOGPROBS}, got {logprobs!r}")
        min_tokens = 0 if prompt_logprobs else 1
        if max_tokens is None:
            max_tokens = self.room(len(ids))
            if max_tokens < 1:
                self.check_context(len(ids), 1)
        elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < min_tokens:
            raise InvalidArgument(f"max_tokens must be an integer >= {min_tokens}, got {max_tokens!r}")
        self.check_context(len(ids), max_tokens)
        sampler = make_sampler(temperature, top_p, top_k, min_p, seed)
        procs = make_logits_processors(repetition_penalty, presence_penalty=presence_penalty,
                                       frequency_penalty=frequency_penalty, logit_bias=logit_bias,
                                       vocab_size=self.vocab_limit)
        if not all(callable(p) for p in logits_processors):
            raise InvalidArgument("logits_processors must be callables (context ids, logits) -> logits")
        procs += list(logits_processors)
        stop = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) for s in stop):
            raise InvalidArgument("stop must be a string or a list of strings")
        if cache is not None and cache.capacity is not None and cache.capacity < len(ids) + max_tokens:
            raise ContextLengthError(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) does not fit "
                                     f"the given cache of {cache.capacity} positions")
        return _Call(ids, max_tokens, sampler, procs, stop, ignore_eos, cache, logprobs, prompt_logprobs)

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
            return _one_at_a_time(responses, self._scheduler.model_lock)
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
    lookup, unless it doubles as the LM head) plus top-k routed experts per MoE layer."""
    args = model.args
    params = sum(p.nbytes for p in model.parameters())
    if not args.tie_word_embeddings:
        params -= model.embed.weight.nbytes
    elem = model.embed.weight.element_size()
    expert = 3 * args.hidden_size * args.expert_dim * elem
    return params + len(args.moe_layers()) * args.top_k * expert


# More threads than this many times the cores only adds contention (and a huge count
# makes OpenMP spend minutes creating threads).
MAX_THREADS_PER_CORE = 4


def check_threads(threads, name: str = "threads") -> int | None:
    """Validate a thread count: None, or an integer from 1 to 4x the cores."""
    if threads is None:
        return None
    import os

    limit = MAX_THREADS_PER_CORE * (os.cpu_count() or 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= limit:
        raise InvalidArgument(f"{name} must be at least 1 and at most {limit} (4x the {os.cpu_count()} cores), "
                              f"got {threads!r}")
    return threads


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


def load(
    path: str | Path | None = None,
    *,
    dtype: str | None = None,
    memory: str | int | None = None,
    threads: int | None = None,
    adaptive_gating: float | None = None,
    ctx_size: int | None = None,
    onednn: bool = True,
    parallel: int = 1,
    **runtime,
) -> Engine:
    """Load a model for generation.

    path: a Hugging Face model directory (everything in RAM) or a directory written by
    `edgemoe convert` (experts offloaded to an expert store). None means the bundled model.
    A string of the form "ORG/NAME" that is not an existing path is a Hugging Face hub id:
    its safetensors weights, config and tokenizer are downloaded into the hub cache (see
    edgemoe.hub).
    memory: for converted models, the byte budget for resident weights plus the expert
    cache ("800MB", "1.5GB" or an int); None means unlimited.
    threads: compute threads for this process (torch's setting is process-wide); None picks
    one thread for small models and torch's default (all cores) otherwise.
    adaptive_gating: adaptive top-k gating (Edge-MoE survey): each token keeps its top
    experts only until this share of routing probability (e.g. 0.8), at least one and at
    most top-k; fewer experts computed and read. None keeps plain top-k.
    ctx_size: the most tokens (prompt + generated) a sequence may hold; the KV cache is
    allocated for it inside the memory budget. None: the model's maximum positions, capped
    so that the KV cache takes at most half of what the budget leaves after the resident
    weights and one layer's experts.
    onednn: False keeps every matmul off oneDNN (by default prefill uses it where the CPU
    has AVX-512-BF16/AMX and the model has 240 MB of weights or more, and the budget
    reserves what it needs; see edgemoe.cpu).
    parallel: sequences that can be decoded together (Engine.generate_batch, the server's
    slots): one KV cache of ctx_size each, all counted in the memory budget.
    runtime: options for the offloaded runtime (cache_policy, prefetch, ...).
    """
    if path is None:
        path = default_model_dir()
    else:
        from .hub import resolve_model

        path = resolve_model(path)  # an existing path, or a hub id ("ORG/NAME") downloaded into the hub cache
    if not isinstance(onednn, bool):
        raise InvalidArgument(f"onednn must be True or False, got {onednn!r}")
    threads = check_threads(threads)
    parallel = check_parallel(parallel)
    if not path.exists():
        from .store.convert import interrupted

        hidden = interrupted(path)
        if hidden is not None:
            raise ModelLoadError(f"{path}: missing: a conversion to it was killed while replacing it, and the previous "
                                 f"model is in {hidden}; the next 'edgemoe convert ... {path}' puts it back")
    if is_converted(path):
        from .runtime.loading import load_converted

        model, info = load_converted(path, memory=memory, dtype=dtype, ctx_size=ctx_size, onednn=onednn,
                                     parallel=parallel, **runtime)
        ctx_size, onednn = info["ctx_size"], info["onednn"]
    else:
        if memory is not None or runtime:
            raise ModelLoadError(
                f"{path}: memory budgets and runtime options need a converted model; run 'edgemoe convert {path} OUT_DIR' first"
            )
        from .checkpoint import load_hf
        from .runtime.loading import check_ctx_size

        model, ckpt = load_hf(path, dtype)
        info = {"kind": "hf", "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
        ctx_size = check_ctx_size(ctx_size, model.args.max_position_embeddings, str(path))
        weight_bytes = sum(p.nbytes for p in model.parameters()) + provider_of(model).expert_bytes()
        onednn = prefill_onednn(onednn, next(model.parameters()).dtype, weight_bytes)
        info["onednn"] = onednn
        info["ctx_size"] = ctx_size
        info["kv_bytes"] = parallel * ctx_size * model.kv_bytes_per_token()  # one KV cache per slot
        info["parallel"] = parallel
    try:
        tokenizer = Tokenizer(path, eos_token_ids=model.args.eos_ids)
        tokenizer.check_vocab(model.args.vocab_size, str(path / (MANIFEST_NAME if info["kind"] == "converted" else "config.json")))
        info["threads"] = set_threads(threads, model)
        if adaptive_gating is not None:
            set_adaptive_gating(model, adaptive_gating)
            info["adaptive_gating"] = adaptive_gating
    except BaseException:
        provider = provider_of(model)
        if provider is not None:
            provider.close()  # stop loader threads and close the store before giving up
        raise
    return Engine(model, tokenizer, path, info, ctx_size=ctx_size, onednn=onednn, parallel=parallel)
