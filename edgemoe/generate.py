"""Generation in layers: `generate_step` yields token ids from a model and a KV cache
(with the model's log-probabilities when asked); `stream_generate` adds detokenized text,
stop conditions, statistics and per-token log-probabilities with their top alternatives.
`stream_generate` may also read its tokens from elsewhere (`steps`): edgemoe.batching
generates several sequences together and hands each its own stream of tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .cpu import native_matmuls
from .models.attention import KVCache
from .models.base import Transformer
from .sample import LogitsProcessor, Sampler, make_sampler
from .tokenizer import Tokenizer
from .utils import peak_rss_bytes


def provider_of(model: Transformer):
    return next((b.provider for b in model.moe_blocks()), None)


class PromptCache:
    """A KV cache plus the token ids it holds, so that a follow-up prompt sharing a prefix
    (the next chat turn) only prefills the new part. `capacity` is the context size in
    tokens (None: grow as needed). `layers` gives the layer caches to use instead of new ones.

    It also keeps the logits of the last prefilled prompt's final position (`end_logits`):
    the same prompt again (a retried or repeated request) then runs no forward at all and
    gets exactly the first request's logits, instead of recomputing its last token in a
    one-position forward, whose fp32 sums run in another order than the prompt's forward."""

    def __init__(self, model: Transformer, capacity: int | None = None, layers: list | None = None):
        self.capacity = capacity
        self.layers: list[KVCache] = model.make_cache(capacity) if layers is None else layers
        self.tokens: list[int] = []
        self.end_logits: tuple[int, torch.Tensor] | None = None  # (position, its logits (1, 1, V))

    def clear(self) -> None:
        """Forget every position (the buffers stay allocated)."""
        for c in self.layers:
            c.trim(c.offset)
        self.tokens = []
        self.end_logits = None

    def reuse(self, prompt: Sequence[int]) -> int:
        """Trim the cache to its longest common prefix with `prompt`; returns its length.
        At least one prompt token is left to prefill, unless the cache holds the whole
        prompt and the logits of its last position (then len(prompt): see `end_logits`)."""
        n = 0
        limit = min(len(self.tokens), len(prompt))
        while n < limit and self.tokens[n] == prompt[n]:
            n += 1
        if not (n == len(prompt) and self.end_logits is not None and self.end_logits[0] == n - 1):
            n = min(n, len(prompt) - 1)
        # A recurrent layer's state cannot go back to an earlier position: unless the whole
        # cached sequence is kept, the prompt is recomputed from the start.
        if any(not getattr(c, "can_trim", True) and c.offset > n for c in self.layers):
            n = 0
        for c in self.layers:
            c.trim(c.offset - n)
        self.tokens = list(prompt[:n])
        if self.end_logits is not None and self.end_logits[0] >= n:
            self.end_logits = None
        return n


PromptLogitsHook = Callable[[int, torch.Tensor], None]  # (position of the first row, logits (T, V) fp32)
SCORE_ELEMENTS = 1 << 24  # logits of one prefill chunk when a prompt is scored (64 MB in fp32)


@torch.inference_mode()
def prefill(model: Transformer, prompt: Sequence[int], cache: PromptCache, prefill_chunk: int = 512,
            onednn: bool = True, prompt_logits: PromptLogitsHook | None = None) -> torch.Tensor:
    """Run the prompt through the model into `cache` (reusing its longest common prefix
    with the prompt, unless `prompt_logits` asks for every row: see generate_step) and
    return the logits of the last chunk: (1, 1, V), or (1, T, V) with prompt_logits."""
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    if prompt_logits is not None:
        cache.clear()
        vocab = getattr(model.args, "vocab_size", None)
        if vocab:  # every row's logits are kept for scoring: bound them to SCORE_ELEMENTS per chunk
            prefill_chunk = max(1, min(prefill_chunk, SCORE_ELEMENTS // vocab))
    start = cache.reuse(prompt)
    if start == len(prompt):  # the whole prompt and its last logits are cached
        return cache.end_logits[1].clone()  # (1, 1, V); a copy: logits processors may work in place
    todo = torch.tensor([list(prompt[start:])], dtype=torch.long)  # (1, T)
    provider = provider_of(model)
    logits = None
    for i in range(0, todo.shape[1], prefill_chunk):
        chunk = todo[:, i : i + prefill_chunk]
        if provider is not None:
            provider.begin_forward(chunk.shape[1])
        with native_matmuls(not onednn):
            logits = model(chunk, cache.layers, last_only=prompt_logits is None)  # (1, T or 1, V)
        if prompt_logits is not None:
            prompt_logits(start + i, logits[0].float())
    cache.tokens = list(prompt)
    cache.end_logits = (len(prompt) - 1, logits[:, -1:].clone())  # (1, 1, V)
    return logits


@torch.inference_mode()
def generate_step(
    model: Transformer,
    prompt: Sequence[int],
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    max_tokens: int = 256,
    cache: PromptCache | None = None,
    prefill_chunk: int = 512,
    onednn: bool = True,
    logprobs: bool = False,
    prompt_logits: PromptLogitsHook | None = None,
) -> Iterator[int] | Iterator[tuple[int, torch.Tensor]]:
    """Yield up to `max_tokens` sampled token ids after `prompt`.

    The next forward pass runs only when the caller asks for the next token, so stopping
    early (EOS, stop string) costs nothing extra. Decode steps run torch's native matmuls
    (faster at one row, see edgemoe.cpu); prefill uses oneDNN where the CPU has it, unless
    `onednn` is False.

    logprobs: yield (token, log-probabilities (V,)) pairs instead of ids: the model's own
    distribution for that step, before logits processors and sampling settings.
    prompt_logits: called once per prefill chunk with the position of its first row and
    the logits of every row (T, V): row i predicts prompt token position + i + 1. The whole
    prompt is then prefilled (no prefix of `cache` is reused). max_tokens 0 only prefills.
    """
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    sampler = sampler or make_sampler(0.0)
    cache = cache or PromptCache(model)
    context = list(prompt)
    provider = provider_of(model)
    logits = prefill(model, context, cache, prefill_chunk, onednn, prompt_logits)

    def step(token: int) -> torch.Tensor:
        if provider is not None:
            provider.begin_forward(1)
        with native_matmuls():
            out = model(torch.tensor([[token]]), cache.layers)  # (1, 1, V)
        cache.tokens.append(token)
        return out

    yield from decode_loop(logits, context, step, sampler, logits_processors, max_tokens, logprobs)


def decode_loop(logits: torch.Tensor, context: list[int], step: Callable[[int], torch.Tensor], sampler: Sampler,
                logits_processors: Sequence[LogitsProcessor], max_tokens: int, logprobs: bool = False):
    """Sample up to `max_tokens` tokens from `logits` (1, T, V) on: each token is yielded
    (with the step's log-probabilities when `logprobs`), appended to `context` (what the
    logits processors read) and fed to `step` (token -> the next logits (1, 1, V)), which
    runs only when the caller asks for the next token. Decoder-only and encoder-decoder
    generation share it."""
    for n in range(max_tokens):
        raw = logits[0, -1].float()  # (V,)
        scores = raw
        for proc in logits_processors:
            scores = proc(context, scores)
        token = sampler(scores)
        yield (token, torch.log_softmax(raw, -1)) if logprobs else token
        if n == max_tokens - 1:
            break
        context.append(token)
        logits = step(token)


@dataclass
class TokenLogprob:
    """A token's log-probability under the model, with the most likely alternatives at
    that position (most likely first; `top` is empty when none were asked for)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def pick_logprobs(logprobs: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Log-probabilities (T, V) -> one TokenLogprob per row for tokens[row], with `top` alternatives."""
    idx = torch.tensor(list(tokens), dtype=torch.long)  # (T,)
    chosen = logprobs.gather(1, idx[:, None])[:, 0].tolist()  # (T,)
    out = [TokenLogprob(t, lp) for t, lp in zip(tokens, chosen)]
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)  # (T, k)
        for entry, v, i in zip(out, values.tolist(), ids.tolist()):
            entry.top = list(zip(i, v))
    return out


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0  # prompt processing and the first token
    decode_s: float = 0.0  # every token after the first
    peak_rss_bytes: int = 0
    ctx_size: int = 0  # the context size of the KV cache used
    kv_bytes: int = 0  # bytes of that KV cache (allocated for ctx_size positions)
    kv_used_bytes: int = 0  # bytes of the positions this sequence filled
    extra: dict = field(default_factory=dict)  # provider statistics (cache hits, bytes read, ...)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "prompt_tps": round(self.prompt_tps, 3),
            "decode_tps": round(self.decode_tps, 3),
            "peak_rss_bytes": self.peak_rss_bytes,
            "ctx_size": self.ctx_size,
            "kv_bytes": self.kv_bytes,
            "kv_used_bytes": self.kv_used_bytes,
            **self.extra,
        }


@dataclass
class GenerationResponse:
    text: str  # text completed by this step (may be empty)
    token: int | None  # the token of this step; None on the final flush
    finish_reason: str | None  # "stop" (EOS or stop string), "length", or None while running
    stats: GenerationStats
    logprobs: TokenLogprob | None = None  # this step's token, when log-probabilities were asked for
    # On the first response only, when prompt log-probabilities were asked for: one entry
    # per prompt token, None for the first (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None


class PromptScorer:
    """The prompt_logits hook that turns each prefill chunk's logits into the prompt's
    log-probabilities (with `top` alternatives): `scored` gets one entry per prompt
    token, None for the first (nothing predicts it)."""

    def __init__(self, ids: Sequence[int], top: int):
        self.ids, self.top = list(ids), top
        self.scored: list[TokenLogprob | None] = [None]

    def __call__(self, pos: int, logits: torch.Tensor) -> None:
        targets = self.ids[pos + 1 : pos + 1 + logits.shape[0]]  # the last row predicts past the prompt
        if targets:
            self.scored.extend(pick_logprobs(torch.log_softmax(logits[: len(targets)], -1), targets, self.top))


def _hold_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def one_at_a_time(responses: Iterator, lock, check: Callable[[], None] | None = None) -> Iterator:
    """The responses, each computed while holding `lock` (so that callers from several
    threads take turns with the model, token by token); `check`, if given, runs under
    the lock before each and may raise to end the sequence. Closing the iterator closes
    `responses`."""
    try:
        while True:
            with lock:
                if check is not None:
                    check()
                r = next(responses, None)
            if r is None:
                return
            yield r
    finally:
        responses.close()


def stream_generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    cache: PromptCache | None = None,
    onednn: bool = True,
    logprobs: int | None = None,
    prompt_logprobs: bool = False,
    steps: Iterator | None = None,
    scorer: PromptScorer | None = None,
    kv_stats: Callable[[], tuple[int, int]] | None = None,
) -> Iterator[GenerationResponse]:
    """Stream text. The last response has a finish_reason and the final statistics.

    logprobs: None, or how many top alternatives to report with each generated token's
    log-probability (0: the token's own only). Log-probabilities are the model's
    distribution, before logits processors and sampling settings.
    prompt_logprobs: also score the prompt (the first response carries them, with
    `logprobs` alternatives); max_tokens may then be 0.
    steps: the tokens (or (token, log-probabilities) pairs with logprobs) from another
    source than generate_step on `model` (edgemoe.batching), whose prefill was given
    `scorer` as its prompt_logits hook when prompt_logprobs is set; `kv_stats` then says
    (context size, positions used) of the KV cache the sequence ran in. The source is
    closed when streaming ends, however it ends.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    stats = GenerationStats(prompt_tokens=len(ids))
    provider = provider_of(model)
    stops = [s for s in stop if s]
    top = logprobs or 0
    if prompt_logprobs and scorer is None:
        scorer = PromptScorer(ids, top)
    scored: list[TokenLogprob | None] | None = scorer.scored if prompt_logprobs else None

    t0 = time.perf_counter()
    if steps is None:
        steps = generate_step(model, ids, sampler, logits_processors, max_tokens, cache, onednn=onednn,
                              logprobs=logprobs is not None, prompt_logits=scorer if prompt_logprobs else None)
    try:
        yield from _stream_steps(steps, tokenizer, ids, stats, stops, ignore_eos, logprobs, top, scored, t0,
                                 model, provider, cache, kv_stats)
    finally:
        close = getattr(steps, "close", None)
        if close is not None:
            close()  # a sequence from the batch scheduler frees its slot


def _stream_steps(steps, tokenizer, ids, stats, stops, ignore_eos, logprobs, top, scored, t0, model, provider, cache,
                  kv_stats) -> Iterator[GenerationResponse]:
    detok = tokenizer.detokenizer()
    pending = ""  # decoded text not yet emitted because it may begin a stop string
    finish, cut = "length", False
    t_first = None
    for step in steps:
        token, lp = step if logprobs is not None else (step, None)
        if t_first is None:
            t_first = time.perf_counter()
            stats.prefill_s = t_first - t0
        stats.generated_tokens += 1
        if not ignore_eos and token in tokenizer.eos_ids:
            finish = "stop"
            break
        pending += detok.add(token)
        if stops:
            hit = min((pending.find(s) for s in stops if s in pending), default=-1)
            if hit >= 0:
                pending, finish, cut = pending[:hit], "stop", True
                break
        emit = len(pending) - _hold_back(pending, stops)
        text, pending = pending[:emit], pending[emit:]
        stats.decode_s = time.perf_counter() - t_first
        entry = pick_logprobs(lp[None], [token], top)[0] if lp is not None else None
        yield GenerationResponse(text, token, None, stats, entry, scored)
        scored = None
    if t_first is not None:
        stats.decode_s = time.perf_counter() - t_first
    else:  # max_tokens 0: the prompt was only scored
        stats.prefill_s = time.perf_counter() - t0
    tail = pending if cut else pending + detok.flush()
    stats.peak_rss_bytes = peak_rss_bytes()
    if kv_stats is not None:
        per_token = model.kv_bytes_per_token()
        capacity, used = kv_stats()
        stats.ctx_size, stats.kv_bytes, stats.kv_used_bytes = capacity, capacity * per_token, used * per_token
    elif cache is not None and cache.capacity is not None:
        per_token = model.kv_bytes_per_token()
        stats.ctx_size, stats.kv_bytes = cache.capacity, cache.capacity * per_token
        stats.kv_used_bytes = cache.layers[0].offset * per_token if cache.layers else 0
    if provider is not None:
        stats.extra = provider.stats()
    yield GenerationResponse(tail, None, finish, stats, None, scored)
