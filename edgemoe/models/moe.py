"""The sparse MoE block and the expert-provider interface it gets its experts from.

Model code does no I/O: an MoE block computes its router, then asks `provider.experts`
for the experts it picked. The in-RAM provider below hands out tensors it already
holds; the offloaded runtime (edgemoe.runtime) reads them from an expert store into a
byte-budgeted cache. Both give bit-identical results because the block's arithmetic
does not depend on the order in which experts arrive.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from ..cpu import Linear, linear
from .base import ACTIVATIONS, MLP


class Expert(Protocol):
    """One routed expert: a gated MLP applied to a batch of token vectors."""

    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N, H)
        ...


class DenseExpert:
    """An expert held as plain float matrices. gate and up are stacked so one matmul
    computes both."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: str = "silu"):
        self._set(torch.cat([gate, up], dim=0).contiguous(), down.contiguous(), act)

    @classmethod
    def from_stacked(cls, w13: torch.Tensor, w2: torch.Tensor, act: str = "silu") -> "DenseExpert":
        """From gate and up already stacked as w13 (2I, H); tensors are used as given."""
        e = cls.__new__(cls)
        e._set(w13, w2, act)
        return e

    def _set(self, w13: torch.Tensor, w2: torch.Tensor, act: str) -> None:
        self.w13 = w13  # (2I, H)
        self.w2 = w2  # (H, I)
        self.act = ACTIVATIONS[act]
        self.nbytes = w13.nbytes + w2.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Weights stored in another float type (fp16 experts, bf16 activations) are used as
        # stored: converting them would keep a second copy outside the cache budget.
        xin = x if x.dtype == self.w13.dtype else x.to(self.w13.dtype)
        g, u = linear(xin, self.w13).chunk(2, dim=-1)  # (N, I) x2
        y = linear(self.act(g) * u, self.w2)  # (N, H)
        return y if y.dtype == x.dtype else y.to(x.dtype)


class ExpertProvider:
    """Where MoE blocks get their experts from.

    `experts(layer, ids, x)` yields `(expert_id, expert)` for every id in `ids`, in any
    order the provider likes (cached ones first, say). An expert is only guaranteed to
    stay valid until the next one is requested. `x` is the block's input (N, H); a
    provider may use it to predict and prefetch later layers.
    """

    def experts(self, layer: int, ids: Sequence[int], x: torch.Tensor) -> Iterator[tuple[int, Expert]]:
        raise NotImplementedError

    def begin_forward(self, num_tokens: int) -> None:
        """Called once at the start of every model forward."""

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

    def experts(self, layer: int, ids: Sequence[int], x: torch.Tensor) -> Iterator[tuple[int, Expert]]:
        for e in ids:
            yield e, self.table[(layer, e)]

    def expert_bytes(self) -> int:
        return sum(e.nbytes for e in self.table.values())


class Router(nn.Module):
    """Linear gate, softmax over all experts, then top-k. With `norm_topk` the k weights
    are renormalised to sum to one (Mixtral always does this: it equals top-k then
    softmax).

    `adaptive` (None = off) is adaptive top-k gating from the Edge-MoE survey: a token
    keeps its ranked experts only until they cover this much routing probability (at least
    one, at most k), so confident tokens load fewer experts. Dropped slots get id -1 and
    weight 0; the kept weights are rescaled to the total the full top-k would have had.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_topk: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.top_k = top_k
        self.norm_topk = norm_topk
        self.adaptive: float | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = linear(x, self.weight)  # (N, E)
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # (N, k) x2, descending
        total = weights.sum(dim=-1, keepdim=True)  # (N, 1)
        if self.adaptive is not None:
            keep = (weights.cumsum(dim=-1) - weights) < self.adaptive  # mass ranked above each slot
            weights = weights * keep
            ids = ids.masked_fill(~keep, -1)
            if not self.norm_topk:
                weights = weights * (total / weights.sum(dim=-1, keepdim=True))
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids, logits


def set_adaptive_gating(model: nn.Module, mass: float | None) -> None:
    """Turn adaptive top-k gating on (keep experts until `mass` of routing probability is
    covered, 0 < mass <= 1) or off (None) for every MoE block of a model."""
    if mass is not None and not 0 < mass <= 1:
        from ..errors import InvalidArgument

        raise InvalidArgument(f"adaptive gating mass must be in (0, 1], got {mass}")
    for module in model.modules():
        if isinstance(module, Router):
            module.adaptive = mass


RoutingHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class MoEBlock(nn.Module):
    """Router + routed experts from a provider, plus an optional shared expert with a
    sigmoid gate (Qwen2-MoE)."""

    def __init__(
        self,
        layer: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        norm_topk: bool,
        act: str = "silu",
        shared_intermediate: int = 0,
        shared_gate: bool = False,
    ):
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.router = Router(hidden, num_experts, top_k, norm_topk)
        self.shared = MLP(hidden, shared_intermediate, act) if shared_intermediate else None
        self.shared_gate = Linear(hidden, 1, bias=False) if shared_gate else None
        self.provider: ExpertProvider | None = None
        self.hook: RoutingHook | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        weights, ids, logits = self.router(x)  # (N, k), (N, k), (N, E)
        if self.hook is not None:
            self.hook(self.layer, ids, weights, logits)
        out = self.routed(x, weights, ids)  # (N, H)
        if self.shared is not None:
            s = self.shared(x)  # (N, H)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x)) * s
            out = out + s
        return out.reshape(shape)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        N, k = ids.shape
        E = self.num_experts
        flat = ids.reshape(-1)  # (N*k,); -1 marks a slot dropped by adaptive gating
        adaptive = self.router.adaptive is not None
        # One output row per (token, slot); filled expert by expert, summed at the end in a
        # fixed order so the result does not depend on the order experts arrive in.
        slots = x.new_zeros(N * k, x.shape[-1]) if adaptive else x.new_empty(N * k, x.shape[-1])  # (N*k, H)
        if N == 1:
            picked = flat.tolist()
            slot = {e: i for i, e in enumerate(picked) if e >= 0}  # top-k ids are distinct
            for e, expert in self.provider.experts(self.layer, list(slot), x):
                slots[slot[e]] = expert(x)[0]
        else:
            key = flat.masked_fill(flat < 0, E) if adaptive else flat  # dropped slots sort last
            order = torch.argsort(key, stable=True)  # (N*k,)
            counts = torch.bincount(key, minlength=E + 1).tolist()[:E]
            starts, wanted, pos = {}, [], 0
            for e, c in enumerate(counts):
                if c:
                    starts[e] = (pos, pos + c)
                    wanted.append(e)
                pos += c
            for e, expert in self.provider.experts(self.layer, wanted, x):
                a, b = starts[e]
                sel = order[a:b]  # slot indices routed to e
                slots[sel] = expert(x[sel // k])
        return (slots.view(N, k, -1) * weights.unsqueeze(-1)).sum(dim=1)  # (N, H)
