"""Samplers and logits processors. Each is a callable built once per request."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .errors import InvalidArgument

Sampler = Callable[[torch.Tensor], int]  # logits (V,) fp32 -> token id
LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]  # (context ids, logits) -> logits


def make_sampler(
    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None
) -> Sampler:
    """Greedy when temperature is 0; otherwise temperature scaling followed by top-k,
    top-p (nucleus) and min-p filtering, then a draw from a seeded generator."""
    if temperature < 0:
        raise InvalidArgument(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0, got {top_k}")
    if temperature == 0:
        return lambda logits: int(torch.argmax(logits))
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else torch.seed())

    def sample(logits: torch.Tensor) -> int:
        logits = logits / temperature  # (V,)
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
    if penalty <= 0:
        raise InvalidArgument(f"repetition_penalty must be > 0, got {penalty}")

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


def make_logits_processors(repetition_penalty: float = 1.0, repetition_context: int = 0) -> list[LogitsProcessor]:
    procs: list[LogitsProcessor] = []
    if repetition_penalty != 1.0:
        procs.append(make_repetition_penalty(repetition_penalty, repetition_context))
    return procs
