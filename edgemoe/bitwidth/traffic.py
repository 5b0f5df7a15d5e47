"""Expected expert bytes read per decoded token, for a plan and an expert cache size:
what `edgemoe plan --bytes-per-token` plans for and `--cache-size` reports.

The model (a static, frequency-pinned cache):
- f_u, how often unit u is needed per token, is its routing frequency on the profile's
  calibration text (the share of tokens routed to it; a unit of several experts sharing
  one blob, a merged group, is needed when any member is: the members' sum, at most 1);
- the cache holds the most frequently needed units: in order of f_u (ties: lower key),
  every unit whose blob still fits in the remaining cache bytes is kept resident;
- every other unit is read from storage each time a token needs it, so the expected
  bytes read per decoded token are sum over uncached units of f_u * bytes_u.

This is the best any cache that never changes its contents can do for these frequencies
(reading a unit costs its bytes, caching it saves f_u of them per token per byte held,
so filling by f_u is the fractional-knapsack optimum up to the last unit that fits). A
dynamic cache (LRU, the runtime's layer-aware policy) also exploits short-term reuse
between neighbouring tokens and can read less, or thrash and read more; `edgemoe
simulate` replays real traces for that. Use this number to compare plans at one budget,
and measured runs (`edgemoe bench`) for what a device reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from .apply import Key


@dataclass
class Traffic:
    bytes_per_token: float  # expected expert bytes read per decoded token
    cached_units: int  # blobs kept resident
    cached_bytes: int
    hit_rate: float  # share of expert uses served from the cache
    needed_per_token: float  # expected expert blobs a token needs (sum of f_u)

    def to_dict(self) -> dict:
        return {"bytes_per_token": self.bytes_per_token, "cached_units": self.cached_units,
                "cached_bytes": self.cached_bytes, "hit_rate": self.hit_rate,
                "needed_per_token": self.needed_per_token}


def unit_frequencies(profile: dict, members: dict[Key, list[Key]]) -> dict[Key, float]:
    """f_u per unit (owner key -> the members' summed routing frequency, at most 1)."""
    freq = {(x["layer"], x["expert"]): float(x.get("frequency", 0.0)) for x in profile["experts"]}
    return {u: min(1.0, sum(freq[k] for k in ks)) for u, ks in members.items()}


def traffic(sizes: dict[Key, int], freq: dict[Key, float], cache_bytes: int) -> Traffic:
    """The static frequency-pinned cache model above for units of `sizes` bytes."""
    left = cache_bytes
    cached, held, hit, miss = 0, 0, 0.0, 0.0
    for u in sorted(sizes, key=lambda u: (-freq[u], u)):
        if sizes[u] <= left:
            left -= sizes[u]
            cached += 1
            held += sizes[u]
            hit += freq[u]
        else:
            miss += freq[u] * sizes[u]
    total = sum(freq.values())
    return Traffic(miss, cached, held, hit / total if total > 0 else 1.0, total)


def first_within(n: int, bpt, target: float) -> int | None:
    """A position k in 0..n with bpt(k) <= target, the first one where bpt is monotone;
    None if even position n misses it. Positions along a plan path only shrink blobs, so
    bpt falls almost monotonically (a shrunk blob can leave cache room that the next one
    in frequency order cannot use): bisection, whose answer always meets the target."""
    if bpt(n) > target:
        return None
    lo, hi = -1, n  # bpt(hi) <= target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if bpt(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi
