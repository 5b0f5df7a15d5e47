"""Low-bit copies on a miss (after HOBBIT, arXiv 2411.01433).

`edgemoe convert --fallback-bits 2|3` stores a second, small copy of every expert
(manifest version 5, store/manifest.py). With `--fallback-below W` the offloaded provider
serves a *missed* expert from its small copy when the expert's share of the routing
weight is below W for every token routed to it: an expert that contributes little to a
token's output is read at a fraction of the bytes (int2: 2.25 bits a weight, against 8 for int8 or 16 for bf16)
instead of stalling the token on a full read. Cached experts are always used as they are,
so hits are untouched and the lossless path is unchanged with the knob off (or at 0).

Share: a token's weight on an expert over the sum of its routed weights (absolute values,
dropped slots excluded), so W means the same for routers that renormalise their top-k
and those that do not; an expert picked by several tokens of a prefill counts its largest
share. A router with one expert per token (share 1) never falls back.

The small copies live in their own small ExpertCache (same slab, O_DIRECT reads, checksum
verification, LRU) carved out of the expert cache's share of the budget: `capacity`
below says how much. The full copies stay the ones the main cache holds and prefetches;
a small copy is only ever read on demand, and only for a miss.
"""

from __future__ import annotations

import torch

from ..store.manifest import ALIGN, Manifest

# The small copies' cache, as a share of what the expert cache gets (at least one blob, at
# most every small copy). 0: one blob, so a small copy is read on every use. Measured on the
# bundled model (edgemoe_lab/results/fallback.md, 40% and 55% budgets, 90 MB/s): giving
# them 10% or 25% of the expert cache turned most small-copy reads into hits but left as
# many more full-copy misses, so bytes per token did not drop (0.45-0.57x of lossless
# against 0.45x), more experts were served small (a larger quality cost) and decode was
# no faster beyond the noise.
CACHE_SHARE = 0.0


def smallest_cache(manifest: Manifest) -> int:
    """Bytes the small copies' cache needs at the least: the largest small blob (experts are
    served one at a time, each released before the next is read)."""
    return max((e.length for e in manifest.fallback.experts), default=0) if manifest.fallback else 0


def capacity(manifest: Manifest, expert_cache: int, share: float | None = None) -> int:
    """The small copies' cache for an expert cache of `expert_cache` bytes (see CACHE_SHARE)."""
    share = CACHE_SHARE if share is None else share
    every = sum(e.length for e in manifest.fallback.experts if e.shares is None)
    want = int(share * expert_cache) // ALIGN * ALIGN
    return max(smallest_cache(manifest), min(want, every))


def largest_shares(rows: torch.Tensor, weights: torch.Tensor, num_experts: int) -> list[float]:
    """Per expert id: the largest share of a token's routing weight it gets, over the rows
    (N, k) of expert ids (-1: a dropped slot) and their weights (N, k); 0 for experts no
    token picked."""
    w = weights.detach().float().abs()  # (N, k)
    r = rows.long()  # (N, k)
    w = torch.where(r >= 0, w, torch.zeros_like(w))
    share = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # (N, k)
    out = torch.zeros(num_experts)  # (E,)
    out.scatter_reduce_(0, r.clamp_min(0).reshape(-1), share.reshape(-1), "amax")
    return out.tolist()
