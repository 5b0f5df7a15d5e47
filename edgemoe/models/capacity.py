"""Routing with expert capacity (Switch Transformers, NLLB-MoE) as transformers runs it in
eval mode, and the MoE block for it.

Tokens choose their experts, then each expert takes at most `capacity` of the tokens of
one routing group, in token order; a token over an expert's capacity skips that expert
(its slot gets id -1 and weight 0), so a token dropped from every slot passes the layer
on the residual alone. Both routers score in fp32 (transformers' router_dtype "float32").

- `Top1CapacityRouter`  Switch: the top-1 softmax probability; capacity counted per
                        sequence (group = one sequence of the batch).
- `Top2CapacityRouter`  NLLB-MoE: top-1 and top-2 of the softmax, weights renormalised
                        over the two (after dropping, unless normalize_before); capacity
                        over all tokens of the call: ceil(eval_fraction * tokens) when
                        that fraction is positive, else `capacity`; the top-2 slots queue
                        behind all top-1 slots of their expert; optionally tokens are
                        queued by their top probability (batch_prioritized).

In a cached decode step (one token) no token is ever over capacity, so decoding token by
token equals a full decoder forward only while the full forward drops nothing either:
exactly transformers' behaviour.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..cpu import linear
from .moe import MoEBlock, slots_by_expert
from .routers import Router


class _FP32Router(Router):
    """A linear gate computed in fp32 (weights kept in fp32), ids -1 for dropped slots."""

    supports_adaptive = False  # capacity, not a probability mass, decides what is dropped
    fp32_params = frozenset({"weight", "bias"})

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.float()
        return self.mask(linear(x.float(), self.weight.float(), b))  # (..., E) fp32


class Top1CapacityRouter(_FP32Router):
    """Switch Transformers' router (see the module notes). forward takes x (B, T, H), one
    routing group per sequence, or (N, H) as one group; returns (weights (N, 1), ids
    (N, 1), logits (N, E))."""

    kind = "top1-capacity"

    def __init__(self, hidden: int, num_experts: int, capacity: int, bias: bool = False):
        super().__init__(hidden, num_experts, 1, norm_topk=False, bias=bias)
        self.capacity = capacity

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seqs = x if x.dim() == 3 else x.unsqueeze(0)  # (B, T, H)
        logits = self.logits(seqs)  # (B, T, E) fp32
        probs = torch.softmax(logits, dim=-1).to(x.dtype)  # (B, T, E)
        top = probs.argmax(dim=-1)  # (B, T)
        queue = F.one_hot(top, self.num_experts).cumsum(dim=1).gather(-1, top[..., None])[..., 0]  # (B, T): 1-based
        kept = queue <= self.capacity
        weights = probs.max(dim=-1).values.masked_fill(~kept, 0)  # (B, T)
        ids = top.masked_fill(~kept, -1)
        return weights.reshape(-1, 1), ids.reshape(-1, 1), logits.reshape(-1, self.num_experts)


class Top2CapacityRouter(_FP32Router):
    """NLLB-MoE's router (see the module notes); x (..., H) is one routing group.
    Returns (weights (N, 2), ids (N, 2), logits (N, E)), the top-1 slot first."""

    kind = "top2-capacity"

    def __init__(self, hidden: int, num_experts: int, capacity: int, eval_fraction: float,
                 normalize_before: bool = False, batch_prioritized: bool = False, bias: bool = False):
        super().__init__(hidden, num_experts, 2, norm_topk=True, bias=bias)
        self.capacity, self.eval_fraction = capacity, eval_fraction
        self.normalize_before, self.batch_prioritized = normalize_before, batch_prioritized

    @staticmethod
    def _normalise(probs: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p1, p2 = (probs * m1).sum(dim=1), (probs * m2).sum(dim=1)  # (N,) x2
        total = torch.clamp(p1 + p2, min=torch.finfo(probs.dtype).eps)
        return p1 / total, p2 / total

    def _queue(self, mask: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
        """(N, E): each chosen slot's 0-based place in its expert's queue, tokens taken in
        `order` (None: token order)."""
        if order is None:
            return mask.cumsum(dim=0) - 1
        ranked = mask[order]
        return ((ranked.cumsum(dim=0) - 1) * ranked)[order.argsort(dim=0)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.logits(x.reshape(-1, x.shape[-1]))  # (N, E) fp32
        N, E = logits.shape
        probs = torch.softmax(logits, dim=-1).to(x.dtype)  # (N, E)
        top1 = probs.argmax(dim=-1)  # (N,)
        m1 = F.one_hot(top1, E)  # (N, E)
        top2 = logits.masked_fill(m1.bool(), float("-inf")).argmax(dim=-1)  # (N,)
        m2 = F.one_hot(top2, E)
        if self.normalize_before:
            p1, p2 = self._normalise(probs, m1, m2)
        order = (-probs.max(dim=1).values).argsort(dim=0) if self.batch_prioritized else None
        q1 = self._queue(m1, order)
        q2 = self._queue(m2, order) + m1.sum(dim=0, keepdim=True)  # top-2 slots queue behind every top-1 slot
        cap = math.ceil(self.eval_fraction * N) if self.eval_fraction > 0 else self.capacity
        m1, m2 = m1 * (q1 < cap), m2 * (q2 < cap)
        if not self.normalize_before:
            p1, p2 = self._normalise(probs, m1, m2)
        k1, k2 = m1.sum(dim=1).bool(), m2.sum(dim=1).bool()  # (N,) slots kept
        weights = torch.stack([p1 * k1, p2 * k2], dim=1)  # (N, 2)
        ids = torch.stack([top1.masked_fill(~k1, -1), top2.masked_fill(~k2, -1)], dim=1)  # (N, 2)
        return weights, ids, logits


class CapacityMoEBlock(MoEBlock):
    """An MoE block for the capacity routers: the router sees the block's input with its
    sequence axis (capacity groups), slots with id -1 get no expert, and the experts'
    outputs are multiplied by `out_scale` before the routing weights (NLLB-MoE's
    moe_token_dropout at inference: 1 - p). No shared expert."""

    def __init__(self, layer: int, router: Router, out_scale: float = 1.0):
        super().__init__(layer, router)
        self.out_scale = out_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        weights, ids, logits = self.router(x)  # (N, k), (N, k), (N, E)
        if self.hook is not None:
            self.hook(self.layer, ids, weights, logits)
        return self.routed(x.reshape(-1, shape[-1]), weights, ids).reshape(shape)

    def _routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                route_x: torch.Tensor) -> torch.Tensor:
        N, k = ids.shape
        E = self.num_experts
        flat = ids.reshape(-1)  # (N*k,); -1: over capacity
        slots = x.new_zeros(N * k, x.shape[-1])  # (N*k, H): a dropped slot adds nothing
        self.provider.note_weights(self.layer, weights)
        if N == 1:
            slot = {e: i for i, e in enumerate(flat.tolist()) if e >= 0}
            if slot:
                for e, expert in self.provider.experts(self.layer, list(slot), route_x, ids):
                    slots[slot[e]] = expert(x)[0]
        else:
            order, starts = slots_by_expert(flat, E)
            if starts:
                for e, expert in self.provider.experts(self.layer, list(starts), route_x, ids):
                    a, b = starts[e]
                    sel = order[a:b]  # slot indices routed to e
                    slots[sel] = expert(x[sel // k])
        if self.out_scale != 1.0:
            slots = slots * self.out_scale
        return (slots.view(N, k, -1) * weights.unsqueeze(-1)).sum(dim=1)  # (N, H)
