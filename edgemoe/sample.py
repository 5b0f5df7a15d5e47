"""Samplers and logits processors. Each is a callable built once per request."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .errors import InvalidArgument

Sampler = Callable[[torch.Tensor], int]  # logits (V,) fp32 -> token id
LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]  # (context ids, logits) -> logits

# Below this, logits / temperature leaves fp32's range for ordinary logit gaps; such a
# temperature is greedy decoding in all but name, so ask for 0 instead.
MIN_TEMPERATURE = 1e-6
SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch's generators accept


def _real(name: str, value, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """A finite real number within [lo, hi] (or (lo, hi] with lo_open), else InvalidArgument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo) or hi is not None and value > hi:
        left = "(" if lo_open else "["
        raise InvalidArgument(f"{name} must be in {left}{lo}, {hi if hi is not None else 'inf'}], got {value}")
    return value


def check_seed(seed) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise InvalidArgument(f"seed must be an integer from -2**63 to 2**64-1, got {seed!r}")
    return seed


def make_sampler(
    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None
) -> Sampler:
    """Greedy when temperature is 0; otherwise temperature scaling followed by top-k,
    top-p (nucleus) and min-p filtering, then a draw from a seeded generator. Every
    option is checked here: non-finite or out-of-range values raise InvalidArgument."""
    temperature = _real("temperature", temperature, 0.0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise InvalidArgument(f"temperature {temperature} is too small: logits / temperature overflows; "
                              f"use 0 for greedy decoding or at least {MIN_TEMPERATURE}")
    top_p = _real("top_p", top_p, 0.0, 1.0, lo_open=True)
    min_p = _real("min_p", min_p, 0.0, 1.0)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise InvalidArgument(f"top_k must be an integer >= 0, got {top_k!r}")
    seed = check_seed(seed)
    if temperature == 0:
        return lambda logits: int(torch.argmax(logits))
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else torch.seed())

    def sample(logits: torch.Tensor) -> int:
        logits = (logits - logits.max()) / temperature  # (V,); shifted so the top logit is 0
        if top_k and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)  # (V,)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            # Drop tokens once the mass before them already reaches top_p; keep at least one.
            drop = (cum - torch.softmax(sorted_logits, -1)) >= top_p
            drop[0] = False
            logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(logits, -1)
        if min_p > 0:
            probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
        return int(torch.multinomial(probs, 1, generator=gen))

    return sample


def make_repetition_penalty(penalty: float, context: int = 0) -> LogitsProcessor:
    """CTRL-style penalty as in transformers: positive logits of seen tokens are divided
    by `penalty`, negative ones multiplied. `context` > 0 limits it to the last N ids."""
    penalty = _real("repetition_penalty", penalty, 0.0, lo_open=True)

    def process(ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        recent = ids[-context:] if context else ids
        if not recent:
            return logits
        idx = torch.tensor(sorted(set(recent)), dtype=torch.long)
        picked = logits[idx]
        logits = logits.clone()
        logits[idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
        return logits

    return process


class PresenceFrequencyPenalty:
    """OpenAI's presence and frequency penalties over the tokens generated so far (not the
    prompt): logit[j] -= frequency * count[j] + presence * (count[j] > 0). The first call
    sees the prompt alone and marks where generation starts."""

    def __init__(self, presence: float = 0.0, frequency: float = 0.0):
        self.presence = _real("presence_penalty", presence, -2.0, 2.0)
        self.frequency = _real("frequency_penalty", frequency, -2.0, 2.0)
        self.start: int | None = None
        self.counts: torch.Tensor | None = None  # (V,) occurrences of each generated token
        self.seen = 0

    def __call__(self, ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = self.seen = len(ids)
            self.counts = torch.zeros(logits.shape[-1], dtype=torch.float32)
        new = [t for t in ids[self.seen :] if 0 <= t < self.counts.shape[0]]
        if new:
            self.counts.index_add_(0, torch.tensor(new, dtype=torch.long), torch.ones(len(new)))
        self.seen = len(ids)
        if self.seen == self.start:
            return logits
        return logits - self.frequency * self.counts - self.presence * (self.counts > 0).float()


MAX_LOGIT_BIAS = 100.0


def make_logit_bias(bias: dict, vocab_size: int) -> LogitsProcessor:
    """Add a bias in [-100, 100] to the logits of chosen token ids ({id: bias}), as OpenAI's
    logit_bias: -100 bans a token, 100 all but forces it."""
    if not isinstance(bias, dict):
        raise InvalidArgument(f"logit_bias must map token ids to numbers, got {type(bias).__name__}")
    ids, values = [], []
    for key, value in bias.items():
        token = key
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            token = int(key)
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise InvalidArgument(f"logit_bias key {key!r} is not a token id of this model (0 to {vocab_size - 1})")
        ids.append(token)
        values.append(_real(f"logit_bias[{key!r}]", value, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS))
    idx, add = torch.tensor(ids, dtype=torch.long), torch.tensor(values, dtype=torch.float32)

    def process(context: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits.index_add_(0, idx, add)
        return logits

    return process


def make_logits_processors(repetition_penalty: float = 1.0, repetition_context: int = 0,
                           presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                           logit_bias: dict | None = None, vocab_size: int | None = None) -> list[LogitsProcessor]:
    """The processors for a request's settings, each checked (InvalidArgument); `vocab_size`
    bounds logit_bias keys."""
    procs: list[LogitsProcessor] = []
    if repetition_penalty != 1.0:
        procs.append(make_repetition_penalty(repetition_penalty, repetition_context))
    penalty = PresenceFrequencyPenalty(presence_penalty, frequency_penalty)
    if penalty.presence or penalty.frequency:
        procs.append(penalty)
    if logit_bias:
        if vocab_size is None:
            raise InvalidArgument("logit_bias needs the vocabulary size")
        procs.append(make_logit_bias(logit_bias, vocab_size))
    return procs
