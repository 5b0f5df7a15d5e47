"""What a routed expert is, independent of where its weights live: the `Expert`
protocol, the gated activations experts and MLPs use, and the float expert.

A leaf module: `models` (which calls experts) and `quant`/`store` (which build them)
both import it, and it imports neither.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .cpu import linear

# hidden_act names from HF configs -> elementwise activation.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

Glu = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _clamped_swiglu(alpha: float, limit: float) -> Glu:
    """gpt-oss: gate clamped from above, up clamped both ways, gate * sigmoid(alpha * gate)
    times (up + 1)."""

    def glu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))

    return glu


# Gated combinations that are not act(gate) * up, by the name experts are built with.
SPECIAL_GLUS: dict[str, Glu] = {"swiglu_clamped": _clamped_swiglu(1.702, 7.0)}


def glu(act: str) -> Glu:
    """The gated combination f(gate, up) for an activation name: act(gate) * up for the
    names in ACTIVATIONS, or one of SPECIAL_GLUS."""
    if act in SPECIAL_GLUS:
        return SPECIAL_GLUS[act]
    fn = ACTIVATIONS[act]
    return lambda g, u: fn(g) * u


def known_activation(act: str) -> bool:
    return act in ACTIVATIONS or act in SPECIAL_GLUS


class Expert(Protocol):
    """One routed expert: a gated MLP applied to a batch of token vectors."""

    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N, H)
        ...


class DenseExpert:
    """An expert held as plain float matrices. gate and up are stacked so one matmul
    computes both. Optional biases b13 (2I,) and b2 (H,) are added after each matmul."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: str = "silu",
                 b13: torch.Tensor | None = None, b2: torch.Tensor | None = None):
        self._set(torch.cat([gate, up], dim=0).contiguous(), down.contiguous(), act, b13, b2)

    @classmethod
    def from_stacked(cls, w13: torch.Tensor, w2: torch.Tensor, act: str = "silu",
                     b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> "DenseExpert":
        """From gate and up already stacked as w13 (2I, H); tensors are used as given."""
        e = cls.__new__(cls)
        e._set(w13, w2, act, b13, b2)
        return e

    def _set(self, w13, w2, act, b13, b2) -> None:
        self.w13 = w13  # (2I, H)
        self.w2 = w2  # (H, I)
        self.b13, self.b2 = b13, b2  # (2I,), (H,) or None
        self.glu = glu(act)
        self.nbytes = sum(t.nbytes for t in (w13, w2, b13, b2) if t is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Weights stored in another float type (fp16 experts, bf16 activations) are used as
        # stored: converting them would keep a second copy outside the cache budget.
        xin = x if x.dtype == self.w13.dtype else x.to(self.w13.dtype)
        h = linear(xin, self.w13)  # (N, 2I)
        if self.b13 is not None:
            h = h + self.b13
        g, u = h.chunk(2, dim=-1)  # (N, I) x2
        y = linear(self.glu(g, u), self.w2)  # (N, H)
        if self.b2 is not None:
            y = y + self.b2
        return y if y.dtype == x.dtype else y.to(x.dtype)


class UngatedDenseExpert:
    """An ungated expert held as plain float matrices: down(act(w1 x + b1)) + b2, the
    feed-forward of Switch Transformers and NLLB-MoE (one input projection, no gate/up
    pair). w1 (I, H), w2 (H, I); optional biases b1 (I,) and b2 (H,)."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, act: str = "relu",
                 b1: torch.Tensor | None = None, b2: torch.Tensor | None = None):
        self.w1, self.w2 = w1, w2  # (I, H), (H, I): used as given (views into a cache slot)
        self.b1, self.b2 = b1, b2  # (I,), (H,) or None
        self.act = ACTIVATIONS[act]
        self.nbytes = sum(t.nbytes for t in (w1, w2, b1, b2) if t is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # As DenseExpert: weights stored in another float type are used as stored.
        xin = x if x.dtype == self.w1.dtype else x.to(self.w1.dtype)
        h = self.act(linear(xin, self.w1, self.b1))  # (N, I)
        y = linear(h, self.w2, self.b2)  # (N, H)
        return y if y.dtype == x.dtype else y.to(x.dtype)
