"""Routing traces: which experts every token picked in every MoE layer.

A trace is recorded from `MoEBlock.hook` during an ordinary run (in RAM or offloaded), or
teacher-forced over a text by `edgemoe trace`, and saved as a compressed `.npz` file
(the container of npzfile.py: numpy's zip of plain arrays, loaded with allow_pickle=False):

    header          uint8   JSON: {"format": "edgemoe-routing-trace", "version": 2,
                            "model_type", "moe_layers": [...], "num_experts", "top_k",
                            "tokens", "forwards", "lookahead_depth", "created_by", ...}
    ids             int16   (T, L, k)  expert ids per token, MoE layer (in layer order) and slot
                            (-1: a slot that adaptive gating or expert capacity dropped;
                            with "encoder_moe_layers" in the header, an encoder-decoder's
                            trace (seq2seq.Seq2SeqTraceRecorder), also every position of
                            the stack a forward did not run)
    weights         float16 (T, L, k)  their routing weights
    forward_tokens  int32   (F,)       tokens processed by each model forward, in order
    lookahead       float16 (T, L, D, E)  optional (D = lookahead_depth > 0): the router
                            logits of MoE layer i+d applied to layer i's MoE input, for
                            d = 1..D (zeros past the last layer); what the gate
                            look-ahead predictor sees (edgemoe.runtime.predict)

Version 1 files (no lookahead, uncompressed) are still read.

T is every token processed (prompt and generated, across requests), L the number of MoE
layers. The requests the cache sees are recovered exactly: forward f covers the next
forward_tokens[f] rows, and each MoE layer in it asks for the distinct ids in those rows.
That is what the Belady policy replays; predictors and plots can use the same file.

`RoutingRecorder` is the general routing hook for tools that watch a model run:
`TraceRecorder` records traces with it; the bundled-model report and the bitwidth
profiler build on it too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import EdgeMoEError
from .npzfile import load_npz, save_npz
from .predict import GateLookahead

TRACE_FORMAT = "edgemoe-routing-trace"
TRACE_VERSION = 2
READABLE_VERSIONS = (1, 2)


class TraceError(EdgeMoEError):
    pass


class RoutingTrace:
    """A routing trace in memory (see the module notes for its arrays); `load` and `save`
    read and write the file."""

    def __init__(self, header: dict, ids: np.ndarray, weights: np.ndarray | None, forward_tokens: np.ndarray,
                 source: str | Path = "<memory>", lookahead: np.ndarray | None = None):
        self.header = header
        self.ids = ids  # (T, L, k)
        self.weights = weights  # (T, L, k) or None
        self.forward_tokens = forward_tokens  # (F,)
        self.source = source
        self.lookahead = lookahead  # (T, L, D, E) or None

    @property
    def moe_layers(self) -> list[int]:
        return list(self.header["moe_layers"])

    def requests(self) -> list[tuple[int, frozenset[int]]]:
        """(layer, distinct expert ids) for every MoE layer call, in execution order. In a
        trace of an encoder-decoder (header "encoder_moe_layers": each forward runs one
        stack) a layer whose rows all hold -1 asked for nothing and is left out."""
        partial = "encoder_moe_layers" in self.header
        out, row = [], 0
        for n in self.forward_tokens.tolist():
            block = self.ids[row : row + n]  # (n, L, k)
            for li, layer in enumerate(self.moe_layers):
                ids = np.unique(block[:, li])
                ids = ids[ids >= 0]  # -1: a slot adaptive gating or expert capacity dropped
                if len(ids) or not partial:
                    out.append((layer, frozenset(ids.tolist())))
            row += n
        return out

    def check_model(self, moe_layers: list[int], num_experts: int, top_k: int) -> None:
        h = self.header
        if list(moe_layers) != self.moe_layers or num_experts != h["num_experts"] or top_k != h["top_k"]:
            raise TraceError(
                f"{self.source}: recorded on a different model (MoE layers {self.moe_layers}, "
                f"{h['num_experts']} experts, top-{h['top_k']}; this model: {list(moe_layers)}, {num_experts}, top-{top_k})"
            )

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary file, then rename)."""
        arrays = {"ids": self.ids, "forward_tokens": self.forward_tokens}
        if self.weights is not None:
            arrays["weights"] = self.weights
        if self.lookahead is not None:
            arrays["lookahead"] = self.lookahead
        save_npz(path, self.header, arrays)

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        """Read and check a trace file (TraceError names what is wrong)."""
        path = Path(path)
        header, z = load_npz(path, what="routing trace", noun="trace", fmt=TRACE_FORMAT, versions=READABLE_VERSIONS,
                             required={"ids", "forward_tokens"}, optional={"weights", "lookahead"}, error=TraceError)
        ids, fwd, weights, lookahead = z["ids"], z["forward_tokens"], z.get("weights"), z.get("lookahead")
        L, k = len(header.get("moe_layers", [])), header.get("top_k")
        if ids.ndim != 3 or ids.shape[1:] != (L, k) or not np.issubdtype(ids.dtype, np.integer):
            raise TraceError(f"{path}: ids array has shape {ids.shape}, expected (tokens, {L}, {k})")
        if fwd.ndim != 1 or int(fwd.sum()) != ids.shape[0] or (fwd < 1).any():
            raise TraceError(f"{path}: forward_tokens do not add up to the {ids.shape[0]} recorded tokens")
        if ids.size and (ids.min() < -1 or ids.max() >= header["num_experts"]):  # -1: dropped by adaptive gating
            raise TraceError(f"{path}: expert ids outside 0..{header['num_experts'] - 1} (and -1 for a dropped slot)")
        if weights is not None and weights.shape != ids.shape:
            raise TraceError(f"{path}: weights shape {weights.shape} does not match ids {ids.shape}")
        if lookahead is not None and (lookahead.ndim != 4 or lookahead.shape[:2] != ids.shape[:2]
                                      or lookahead.shape[3] != header["num_experts"]):
            raise TraceError(f"{path}: lookahead shape {lookahead.shape} does not match ids {ids.shape}")
        return cls(header, ids, weights, fwd, path, lookahead)


class RoutingRecorder:
    """Sees the routing of every MoE block of a model, call by call, through the blocks'
    routing hooks (traces, the bundled-model report and the bitwidth profiler build on
    it). Hooks already set keep running (it chains to them) and `detach` restores them.

    Subclasses override `on_route(i, ids, weights, logits)`, called for every block call
    with the block's MoE position i and its routing: ids (N, k) (-1: a slot adaptive
    gating dropped), weights (N, k) and router logits (N, E). With `inputs=True` the
    block's input (N, H) of that call is `self.x` (taken with a forward pre-hook). While
    `active` is False, calls are not recorded (a caller's reruns)."""

    def __init__(self, model, inputs: bool = False):
        self.blocks = list(model.moe_blocks())
        if not self.blocks:
            raise TraceError("the model has no MoE layers to record routing from")
        self.layers = [b.layer for b in self.blocks]
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        b0 = self.blocks[0]
        self.num_experts, self.top_k = b0.num_experts, b0.router.top_k
        self.active = True
        self.x: torch.Tensor | None = None  # (N, H): the input of the block call being recorded
        self._pre = [b.register_forward_pre_hook(self._stash) for b in self.blocks] if inputs else []
        self._prev = [b.hook for b in self.blocks]
        for b, prev in zip(self.blocks, self._prev):
            b.hook = self._make_hook(prev)

    def on_route(self, i: int, ids: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor) -> None:
        """One MoE block call (position i) routed; see the class notes."""

    def _stash(self, module, args) -> None:
        if self.active:
            x = args[0]
            self.x = x.reshape(-1, x.shape[-1])  # (N, H)

    def _make_hook(self, prev):
        def hook(layer: int, ids: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor) -> None:
            if self.active:
                self.on_route(self.index[layer], ids, weights, logits)
            if prev is not None:
                prev(layer, ids, weights, logits)

        return hook

    def detach(self) -> None:
        """Remove the recorder's hooks and put back the ones it found."""
        for b, prev in zip(self.blocks, self._prev):
            b.hook = prev
        for h in self._pre:
            h.remove()
        self._pre = []


class TraceRecorder(RoutingRecorder):
    """Records a routing trace (`trace`, `save`): every token's experts and weights in
    every MoE layer, forward by forward. With `lookahead=D` it also records the gate
    look-ahead logits of the next D MoE layers on each block's input."""

    def __init__(self, model, lookahead: int = 0):
        from .._version import __version__

        L = sum(1 for _ in model.moe_blocks())
        self.depth = max(0, min(int(lookahead), L - 1))
        super().__init__(model, inputs=self.depth > 0)
        self.model_type = getattr(model.args, "model_type", "")
        self.version = __version__
        self.ids: list[list[np.ndarray]] = [[] for _ in self.layers]  # per layer: (N, k) per forward
        self.weights: list[list[np.ndarray]] = [[] for _ in self.layers]
        self.forward_tokens: list[int] = []
        self.gate = GateLookahead.from_model(model) if self.depth else None
        self.look: list[list[np.ndarray]] = [[] for _ in self.layers]  # per layer: (N, D, E) per forward
        self._expect = 0  # index of the MoE layer the next hook call must come from

    def on_route(self, i: int, ids: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor) -> None:
        if i == 0:
            if self._expect != 0:  # the previous forward stopped early (an error): drop it
                self._drop_partial()
            self.forward_tokens.append(ids.shape[0])
        elif i != self._expect:
            raise TraceError(f"routing trace: MoE layer {self.layers[i]} ran out of order")
        self.ids[i].append(ids.to(torch.int16 if self.num_experts < 32768 else torch.int32).numpy().copy())
        self.weights[i].append(weights.detach().to(torch.float16).numpy().copy())
        if self.depth:
            look = np.zeros((ids.shape[0], self.depth, self.num_experts), np.float16)  # (N, D, E)
            for d in range(1, self.depth + 1):
                if i + d < len(self.layers):
                    look[:, d - 1] = self.gate.logits(self.x, i + d).to(torch.float16).numpy()
            self.look[i].append(look)
        self._expect = (i + 1) % len(self.layers)

    def _drop_partial(self) -> None:
        for i in range(self._expect):
            self.ids[i].pop()
            self.weights[i].pop()
            if self.depth:
                self.look[i].pop()
        self.forward_tokens.pop()
        self._expect = 0

    def trace(self) -> RoutingTrace:
        """What was recorded so far (a forward cut short by an error is left out)."""
        if self._expect != 0:
            self._drop_partial()
        k = self.top_k
        T = sum(self.forward_tokens)
        L = len(self.layers)
        if T:
            ids = np.stack([np.concatenate(x) for x in self.ids], axis=1)  # (T, L, k)
            weights = np.stack([np.concatenate(x) for x in self.weights], axis=1)  # (T, L, k)
            look = np.stack([np.concatenate(x) for x in self.look], axis=1) if self.depth else None  # (T, L, D, E)
        else:
            ids = np.zeros((0, L, k), np.int16)
            weights = np.zeros((0, L, k), np.float16)
            look = np.zeros((0, L, self.depth, self.num_experts), np.float16) if self.depth else None
        header = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "model_type": self.model_type,
                  "moe_layers": self.layers, "num_experts": self.num_experts, "top_k": k, "tokens": T,
                  "forwards": len(self.forward_tokens), "lookahead_depth": self.depth,
                  "created_by": f"edgemoe {self.version}"}
        return RoutingTrace(header, ids, weights, np.asarray(self.forward_tokens, dtype=np.int32), lookahead=look)

    def save(self, path: str | Path) -> RoutingTrace:
        """Write the trace recorded so far to `path`; returns it."""
        t = self.trace()
        t.source = path
        t.save(path)
        return t
