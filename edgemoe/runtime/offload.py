"""`OffloadedProvider`: the ExpertProvider that serves MoE blocks from the expert cache.

For one layer's request it pins the experts that are already cached (so that loading the
others cannot evict them), yields those first, then loads and yields the misses one at a
time. Each expert is leased while the block computes with it and released when the next
one is requested, so a prefill that needs more distinct experts than the cache holds
simply reuses the room of experts it has finished with; the slab is never exceeded.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..models.moe import Expert, ExpertProvider
from ..utils import peak_rss_bytes
from .cache import ExpertCache


class OffloadedProvider(ExpertProvider):
    def __init__(self, cache: ExpertCache, info: dict):
        self.cache = cache
        self.info = info  # static facts for the statistics: mode, policy, budget, resident bytes, baseline RSS
        self.reset_stats()

    def begin_forward(self, num_tokens: int) -> None:
        with self.cache.cond:
            self.cache.policy.on_forward(num_tokens)
        self._account()
        self._phase = "decode" if num_tokens == 1 else "prefill"
        self.tokens += num_tokens
        self.forwards += 1
        if num_tokens == 1:
            self.decode_forwards += 1

    def _account(self) -> None:
        """Add the counters' growth since the last forward began to the phase (prefill or
        decode) that forward belonged to: the paper's numbers are decode numbers."""
        c = self.cache
        with c.cond:
            now = (c.hits, c.misses, c.store.bytes_read, c.stall_s)
        acc = self._phases[self._phase]
        for i, (a, b) in enumerate(zip(now, self._mark)):
            acc[i] += a - b
        self._mark = now

    def experts(self, layer: int, ids: Sequence[int], x: torch.Tensor) -> Iterator[tuple[int, Expert]]:
        cache = self.cache
        keys = [(layer, int(e)) for e in ids]
        with cache.cond:
            cache.policy.on_request(layer, [k[1] for k in keys])
            pinned = cache.pin(keys)
        present = set(pinned)
        order = pinned + [k for k in keys if k not in present]  # cached experts first
        try:
            for key in order:
                entry, _ = cache.acquire(key)
                if key in present:  # the lease protects it from here on
                    cache.unpin([key])
                    present.discard(key)
                try:
                    yield key[1], cache.expert(entry)
                finally:
                    cache.release(entry)
        finally:
            if present:  # the caller stopped early (or a load failed): drop the remaining pins
                cache.unpin(list(present))

    def stats(self) -> dict:
        self._account()
        c = self.cache.stats()
        dh, dm, db, ds = self._phases["decode"]
        info = self.info
        resident = info["resident_bytes"]
        baseline = info["baseline_rss_bytes"]
        out = {
            "mode": info["mode"],
            "cache_policy": info["cache_policy"],
            "io": self.cache.store.io_mode,
            "hits": c["hits"],
            "misses": c["misses"],
            "hit_rate": c["hit_rate"],
            "bytes_read": c["bytes_read"],
            "bytes_read_per_token": round(c["bytes_read"] / self.tokens) if self.tokens else 0,
            "read_s": c["read_s"],
            "verify_s": c["verify_s"],
            "stall_s": c["stall_s"],
            "evictions": c["evictions"],
            "compactions": c["compactions"],
            "forward_tokens": self.tokens,
            "decode_hit_rate": round(dh / (dh + dm), 4) if dh + dm else 0.0,
            "decode_bytes_read_per_token": round(db / self.decode_forwards) if self.decode_forwards else 0,
            "decode_stall_s": round(ds, 6),
            "budget_bytes": info["budget_bytes"],
            "min_budget_bytes": info["min_budget_bytes"],
            "resident_bytes": resident,
            "cache_bytes": c["cache_bytes"],
            "cache_peak_bytes": c["cache_peak_bytes"],
            # Memory this model really holds: resident weights plus every slab page ever written.
            "budget_used_bytes": resident + c["cache_touched_bytes"],
            "baseline_rss_bytes": baseline,
            "rss_over_baseline_bytes": max(peak_rss_bytes() - baseline, 0),
        }
        if c["compact_bytes"]:
            out["compact_bytes"] = c["compact_bytes"]
        if c["background_loads"]:
            out["background_loads"] = c["background_loads"]
        out.update(self.cache.policy.describe())
        return out

    def reset_stats(self) -> None:
        self.cache.reset_stats()
        self.tokens = self.forwards = self.decode_forwards = 0
        self._phase = "prefill"
        self._phases = {"prefill": [0, 0, 0, 0.0], "decode": [0, 0, 0, 0.0]}  # hits, misses, bytes, stall
        self._mark = (0, 0, 0, 0.0)

    def close(self) -> None:
        self.cache.close()
