"""The sparse MoE block and the expert-provider interface it gets its experts from.

Model code does no I/O: an MoE block computes its router, then asks `provider.experts`
for the experts it picked. The in-RAM provider below hands out tensors it already
holds; the offloaded runtime (edgemoe.runtime) reads them from an expert store into a
byte-budgeted cache. Both give bit-identical results because the block's arithmetic
does not depend on the order in which experts arrive.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import InvalidArgument
from ..experts import Expert
from ..fastops import combine
from .routers import Router


class ExpertProvider:
    """Where MoE blocks get their experts from.

    `experts(layer, ids, x)` yields `(expert_id, expert)` for every id in `ids`, in any
    order the provider likes (cached ones first, say). An expert is only guaranteed to
    stay valid until the next one is requested. `x` is the block's input (N, H) and
    `rows` (N, k) the experts each token routed to (-1: a slot adaptive gating dropped);
    a provider may use them to predict and prefetch later layers.
    """

    def experts(self, layer: int, ids: Sequence[int], x: torch.Tensor,
                rows: torch.Tensor | None = None) -> Iterator[tuple[int, Expert]]:
        raise NotImplementedError

    def begin_forward(self, num_tokens: int) -> None:
        """Called once at the start of every model forward."""

    def resident(self, layer: int) -> set[int] | None:
        """The experts of `layer` that are in memory now (cached or being read), for
        cache-aware routing; None means every expert is (nothing to prefer)."""
        return None

    def note_cache_routing(self, layer: int, slots: int, swapped: int) -> None:
        """Cache-aware routing at `layer` considered `slots` routed slots and swapped
        `swapped` of them to resident experts (for the statistics)."""

    def note_weights(self, layer: int, weights: torch.Tensor) -> None:
        """The routing weights (N, k) of the `experts` request for `layer` that follows,
        slot for slot with its `rows`; a provider may serve an expert that carries little
        weight from a cheaper copy (runtime/fallback.py)."""

    def stats(self) -> dict:
        """Counters since the last reset (hits, misses, bytes read, ...), JSON-ready."""
        return {}

    def reset_stats(self) -> None:
        pass

    def close(self) -> None:
        pass


class InRAMProvider(ExpertProvider):
    """Every expert lives in RAM; nothing is ever read."""

    def __init__(self, experts: dict[tuple[int, int], Expert]):
        self.table = experts

    def experts(self, layer: int, ids: Sequence[int], x: torch.Tensor,
                rows: torch.Tensor | None = None) -> Iterator[tuple[int, Expert]]:
        for e in ids:
            yield e, self.table[(layer, e)]

    def expert_bytes(self) -> int:
        return sum(e.nbytes for e in self.table.values())


def set_adaptive_gating(model: nn.Module, mass: float | None) -> None:
    """Turn adaptive top-k gating on (keep experts until `mass` of routing probability is
    covered, 0 < mass <= 1) or off (None) for every MoE block of a model."""
    if mass is not None and not 0 < mass <= 1:
        raise InvalidArgument(f"adaptive gating mass must be in (0, 1], got {mass}")
    routers = [m for m in model.modules() if isinstance(m, Router)]
    if mass is not None:
        for r in routers:
            if not r.supports_adaptive:
                raise InvalidArgument(f"adaptive gating (--adaptive-gating) keeps experts until a share of the "
                                      f"softmax routing probability is covered; this model's {r.kind} router has "
                                      "no such distribution, so it does not support it")
    for r in routers:
        r.adaptive = mass


def set_cache_aware_routing(model: nn.Module, margin: float | None) -> None:
    """Turn cache-aware routing on (prefer experts the provider holds when their routing
    score is within `margin` of a chosen one's; see routers.cache_route) or off (None)
    for every MoE block of a model. Refused, before anything changes, for a margin outside
    (0, 1] and for router kinds it cannot apply to. The block only asks its provider which
    experts are resident (`ExpertProvider.resident`): model code still does no I/O."""
    if margin is not None:
        check_cache_aware_routing(model, margin)
    for b in model.moe_blocks():
        handle = getattr(b, "_cache_routing_handle", None)
        if handle is not None:
            handle.remove()
            b._cache_routing_handle = None
        if margin is not None:
            b._cache_routing_handle = b.router.register_forward_hook(_cache_routing_hook(b, float(margin)))


def check_cache_aware_routing(model: nn.Module, margin) -> None:
    """Raise InvalidArgument unless `margin` is in (0, 1] and every router of the model
    supports cache-aware routing."""
    from .routers import cache_routing_unsupported

    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin <= 1:
        raise InvalidArgument(f"cache-aware routing margin must be a routing-probability difference in (0, 1], "
                              f"got {margin!r}")
    for b in model.moe_blocks():
        why = cache_routing_unsupported(b.router)
        if why is not None:
            raise InvalidArgument(f"cache-aware routing (--cache-aware-routing) swaps experts whose routing "
                                  f"scores are within a margin; this model's {b.router.kind} router does not "
                                  f"support it: {why}")


def _cache_routing_hook(block: nn.Module, margin: float):
    """A forward hook on `block`'s router that applies cache-aware routing to its output,
    so every family's block (whatever its own forward) routes through it."""
    from .routers import cache_route

    def hook(router, inputs, output):
        provider = block.provider
        resident = provider.resident(block.layer) if provider is not None else None
        if resident is None:  # everything is in memory: nothing to prefer
            return None
        weights, ids, logits = output
        weights, ids, swapped = cache_route(router, logits, weights, ids, resident, margin)
        slots = ids.shape[1] - ids[0].tolist().count(-1) if ids.shape[0] == 1 else int((ids >= 0).sum())
        provider.note_cache_routing(block.layer, slots, swapped)
        return weights, ids, logits

    return hook


RoutingHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
# expert_hook(layer, x, weights, ids, out), called once the routed experts of a block call
# have run: x (N, H) exactly as the experts received it (before any input scaling),
# weights and ids (N, k) as routed, out (N, H) their combined output before the block adds
# or scales anything else. Tools that weigh experts (the bitwidth profiler, expert
# statistics) use it rather than rebuilding each family's block around the experts.
ExpertHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]



def slots_by_expert(flat: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, dict[int, tuple[int, int]]]:
    """Group the (token, slot) entries of `flat` (N*k,) expert ids (-1: a dropped slot) by
    expert: `order` (N*k,) lists slot indices expert by expert (stable, dropped slots last),
    and `starts[e] = (a, b)` is expert e's range in it, for the experts some slot picked,
    in ascending id order."""
    key = flat.masked_fill(flat < 0, num_experts)  # dropped slots sort last
    order = torch.argsort(key, stable=True)  # (N*k,)
    starts, pos = {}, 0
    for e, c in enumerate(torch.bincount(key, minlength=num_experts + 1).tolist()[:num_experts]):
        if c:
            starts[e] = (pos, pos + c)
        pos += c
    return order, starts

class MoEBlock(nn.Module):
    """Router + routed experts from a provider, plus an optional always-on shared expert,
    optionally scaled by sigmoid(shared_gate(x)) (Qwen2-MoE).

    With a router whose `scales_input` is set (Llama 4), each expert sees its input
    multiplied by the routing weight and its outputs are summed unweighted."""

    def __init__(self, layer: int, router: Router, shared: nn.Module | None = None,
                 shared_gate: nn.Module | None = None):
        super().__init__()
        self.layer = layer
        self.num_experts = router.num_experts
        self.router = router
        self.shared = shared
        self.shared_gate = shared_gate
        self.provider: ExpertProvider | None = None
        self.hook: RoutingHook | None = None
        self.expert_hook: ExpertHook | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output for x (..., H); with `residual` (x's shape), residual + that
        output (DecoderLayer's add, done in the experts' combine on a decode step)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        weights, ids, logits = self.router(x)  # (N, k), (N, k), (N, E)
        if self.hook is not None:
            self.hook(self.layer, ids, weights, logits)
        if residual is not None and self.shared is None and self.expert_hook is None:
            return self._routed(x, weights, ids, x, residual)  # residual's shape
        out = self.routed(x, weights, ids)  # (N, H)
        if residual is not None:
            return residual + self._shared(x, out).reshape(shape)
        return self._shared(x, out).reshape(shape)

    def _shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (N, H) plus the shared expert's output on x (N, H), if the block has one."""
        if self.shared is not None:
            s = self.shared(x)  # (N, H)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x)) * s
            out = out + s
        return out

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               route_x: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted routed experts on x (N, H). `route_x` is the block's input the
        router saw, what the provider is told about for prediction when the experts see
        something else (Gemma 4 runs them on a norm of it); default x."""
        out = self._routed(x, weights, ids, x if route_x is None else route_x)  # (N, H)
        if self.expert_hook is not None:
            self.expert_hook(self.layer, x, weights, ids, out)
        return out

    def _routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                route_x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted routed experts on x (N, H): (N, H), or residual + that in residual's
        shape when given."""
        N, k = ids.shape
        E = self.num_experts
        flat = ids.reshape(-1)  # (N*k,); -1 marks a slot dropped by adaptive gating
        adaptive = self.router.adaptive is not None
        on_input = self.router.scales_input
        # One output row per (token, slot); filled expert by expert, summed at the end in a
        # fixed order so the result does not depend on the order experts arrive in.
        slots = x.new_zeros(N * k, x.shape[-1]) if adaptive else x.new_empty(N * k, x.shape[-1])  # (N*k, H)
        self.provider.note_weights(self.layer, weights)
        if N == 1:
            picked = flat.tolist()
            slot = {e: i for i, e in enumerate(picked) if e >= 0}  # top-k ids are distinct
            for e, expert in self.provider.experts(self.layer, list(slot), route_x, ids):
                i = slot[e]
                slots[i] = expert(x * weights[0, i] if on_input else x)[0]
        else:
            order, starts = slots_by_expert(flat, E)
            wanted = list(starts)
            w_flat = weights.reshape(-1, 1)  # (N*k, 1)
            for e, expert in self.provider.experts(self.layer, wanted, route_x, ids):
                a, b = starts[e]
                sel = order[a:b]  # slot indices routed to e
                xin = x[sel // k]  # (n, H)
                slots[sel] = expert(xin * w_flat[sel] if on_input else xin)
        if N == 1 and not on_input:  # one C call; rounds as the torch lines below do, bit for bit
            out = combine(slots, weights, residual)  # (1, H) or residual's shape
            if out is not None:
                return out
        if on_input:
            out = slots.view(N, k, -1).sum(dim=1)  # (N, H)
        else:
            out = (slots.view(N, k, -1) * weights.unsqueeze(-1)).sum(dim=1)  # (N, H)
        return out if residual is None else residual + out.reshape(residual.shape)
