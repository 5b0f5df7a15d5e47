"""Cache eviction policies, chosen by name (`--cache-policy`).

A policy only ranks; the cache decides what may be evicted (never an expert the current
layer still needs, never one being read or in use) and asks `victim(candidates)` for
the next one to go. Callbacks tell the policy what happened:

    on_forward(num_tokens)      a model forward begins (one decode step, or a prefill chunk)
    on_request(layer, ids)      an MoE layer asks for these experts (in layer order)
    on_access(key)              an expert is used (after a hit or a load)
    on_insert(key) / on_evict(key)

Keys are (layer, expert). All calls come with the cache's lock held.

Policies:
- lru      least recently used goes first (mixtral-offloading's choice).
- lfu      least frequently used goes first; ties go to the least recent.
- edgemoe  the EdgeMoE paper's score L = -f / d: f is the expert's activation count, d the
           distance going forward in layer order from the current layer to the expert's
           layer. The highest L goes first, i.e. rarely used experts of layers that run far
           in the future. d runs from 1 (the next MoE layer) to S (the current layer itself,
           whose next use is a whole forward pass away), which is the paper's intent without
           its division by zero.
- belady   the offline optimum: evict the expert whose next use is furthest in the future,
           read from a routing trace recorded on the same prompt (edgemoe.runtime.trace).
           An upper bound for analysis; it refuses to continue if routing diverges from
           the trace.

Add a policy with `@register_policy("name")` on a Policy subclass.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from ..errors import EdgeMoEError

Key = tuple[int, int]


@dataclass
class PolicyContext:
    """What a policy may know about the model and run."""

    moe_layers: list[int]
    experts_per_layer: int
    top_k: int
    trace: object | None = None  # a RoutingTrace, for belady


class Policy:
    name = ""

    def __init__(self, ctx: PolicyContext):
        self.ctx = ctx
        self.tick = itertools.count()

    def on_forward(self, num_tokens: int) -> None:
        pass

    def on_request(self, layer: int, ids: Sequence[int]) -> None:
        pass

    def on_access(self, key: Key) -> None:
        pass

    def on_insert(self, key: Key) -> None:
        pass

    def on_evict(self, key: Key) -> None:
        pass

    def victim(self, candidates: Iterable[Key]) -> Key:
        """The candidate to evict first; `candidates` is non-empty."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {}


POLICIES: dict[str, type[Policy]] = {}


def register_policy(name: str) -> Callable[[type[Policy]], type[Policy]]:
    def deco(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        POLICIES[name] = cls
        return cls

    return deco


def make_policy(name: str, ctx: PolicyContext) -> Policy:
    if name not in POLICIES:
        raise EdgeMoEError(f"unknown cache policy {name!r} (choose from {', '.join(POLICIES)})")
    return POLICIES[name](ctx)


@register_policy("lru")
class LRU(Policy):
    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        self.order: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def on_insert(self, key: Key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def on_access(self, key: Key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def on_evict(self, key: Key) -> None:
        self.order.pop(key, None)

    def victim(self, candidates: Iterable[Key]) -> Key:
        cand = set(candidates)
        for key in self.order:  # usually the very first one is evictable
            if key in cand:
                return key
        return min(cand)


class _Counting(Policy):
    """Activation counts (kept across evictions: frequency is a property of the expert,
    not of its stay in the cache) and last-use ticks."""

    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        self.freq: dict[Key, int] = {}
        self.last: dict[Key, int] = {}

    def on_request(self, layer: int, ids: Sequence[int]) -> None:
        for e in ids:
            self.freq[(layer, e)] = self.freq.get((layer, e), 0) + 1

    def on_access(self, key: Key) -> None:
        self.last[key] = next(self.tick)

    def on_insert(self, key: Key) -> None:
        self.last.setdefault(key, next(self.tick))


@register_policy("lfu")
class LFU(_Counting):
    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=lambda k: (self.freq.get(k, 0), self.last.get(k, -1), k))


@register_policy("edgemoe")
class EdgeMoEScore(_Counting):
    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        self.pos = {layer: i for i, layer in enumerate(ctx.moe_layers)}  # layer -> position in MoE order
        self.S = max(len(ctx.moe_layers), 1)
        self.current = 0  # position of the layer running now

    def on_request(self, layer: int, ids: Sequence[int]) -> None:
        super().on_request(layer, ids)
        self.current = self.pos.get(layer, 0)

    def distance(self, layer: int) -> int:
        """Forward distance in MoE-layer order: 1 for the next layer ... S for this one."""
        return (self.pos.get(layer, 0) - self.current - 1) % self.S + 1

    def score(self, key: Key) -> float:
        return -self.freq.get(key, 0) / self.distance(key[0])

    def victim(self, candidates: Iterable[Key]) -> Key:
        # Highest score first; among equals, the least recently used.
        return max(candidates, key=lambda k: (self.score(k), -self.last.get(k, -1), k))


@register_policy("belady")
class Belady(Policy):
    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        trace = ctx.trace
        if trace is None:
            raise EdgeMoEError("cache policy 'belady' needs a routing trace (--trace FILE, recorded with "
                               "--record-trace FILE on the same prompt and options)")
        trace.check_model(ctx.moe_layers, ctx.experts_per_layer, ctx.top_k)
        self.trace = trace
        self.events = trace.requests()  # [(layer, frozenset(ids))] in execution order
        self.uses: dict[Key, list[int]] = {}
        for t, (layer, ids) in enumerate(self.events):
            for e in ids:
                self.uses.setdefault((layer, e), []).append(t)
        self.t = -1  # index of the current request

    def on_request(self, layer: int, ids: Sequence[int]) -> None:
        self.t += 1
        if self.t >= len(self.events):
            raise EdgeMoEError(f"belady: the run went past the end of the routing trace {self.trace.source} "
                               f"({len(self.events)} layer requests); record the trace with the same prompt and options")
        want_layer, want_ids = self.events[self.t]
        if layer != want_layer or frozenset(ids) != want_ids:
            raise EdgeMoEError(f"belady: routing diverged from the trace {self.trace.source} at request {self.t} "
                               f"(layer {layer}: got experts {sorted(ids)}, trace has layer {want_layer} "
                               f"{sorted(want_ids)}); record the trace with the same prompt and options")

    def next_use(self, key: Key) -> float:
        times = self.uses.get(key)
        if not times:
            return float("inf")
        i = bisect.bisect_right(times, self.t)
        return times[i] if i < len(times) else float("inf")

    def victim(self, candidates: Iterable[Key]) -> Key:
        return max(candidates, key=lambda k: (self.next_use(k), k))

    def describe(self) -> dict:
        return {"trace": str(self.trace.source), "trace_requests": len(self.events), "trace_position": self.t + 1}
