"""Routing traces: which experts every token picked in every MoE layer.

A trace is recorded from `MoEBlock.hook` during an ordinary run (in RAM or offloaded), or
teacher-forced over a text by `edgemoe trace`, and saved as a compressed `.npz` file
(numpy's zip of plain arrays, loaded with allow_pickle=False):

    header          uint8   JSON: {"format": "edgemoe-routing-trace", "version": 2,
                            "model_type", "moe_layers": [...], "num_experts", "top_k",
                            "tokens", "forwards", "lookahead_depth", "created_by", ...}
    ids             int16   (T, L, k)  expert ids per token, MoE layer (in layer order) and slot
                            (-1: a slot that adaptive gating dropped)
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
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import EdgeMoEError
from ..utils import save_npz_atomic

TRACE_FORMAT = "edgemoe-routing-trace"
TRACE_VERSION = 2
READABLE_VERSIONS = (1, 2)


class TraceError(EdgeMoEError):
    pass


class RoutingTrace:
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
        """(layer, distinct expert ids) for every MoE layer call, in execution order."""
        out, row = [], 0
        for n in self.forward_tokens.tolist():
            block = self.ids[row : row + n]  # (n, L, k)
            for li, layer in enumerate(self.moe_layers):
                ids = np.unique(block[:, li])
                out.append((layer, frozenset(ids[ids >= 0].tolist())))  # -1: a slot adaptive gating dropped
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
        arrays = {"header": np.frombuffer(json.dumps(self.header).encode(), dtype=np.uint8),
                  "ids": self.ids, "forward_tokens": self.forward_tokens}
        if self.weights is not None:
            arrays["weights"] = self.weights
        if self.lookahead is not None:
            arrays["lookahead"] = self.lookahead
        save_npz_atomic(path, arrays)

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        path = Path(path)
        if not path.exists():
            raise TraceError(f"{path}: routing trace not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                files = set(z.files)
                if not {"header", "ids", "forward_tokens"} <= files:
                    raise TraceError(f"{path}: not an edgemoe routing trace (arrays: {', '.join(sorted(files))})")
                header = json.loads(z["header"].tobytes().decode())
                ids, fwd = z["ids"], z["forward_tokens"]
                weights = z["weights"] if "weights" in files else None
                lookahead = z["lookahead"] if "lookahead" in files else None
        except TraceError:
            raise
        except Exception as e:  # zip, npy and JSON errors all mean an unusable file
            raise TraceError(f"{path}: cannot read routing trace: {e}") from None
        if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
            raise TraceError(f"{path}: not an edgemoe routing trace")
        if header.get("version") not in READABLE_VERSIONS:
            raise TraceError(f"{path}: trace version {header.get('version')!r} is not supported "
                             f"(expected {' or '.join(map(str, READABLE_VERSIONS))})")
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


class TraceRecorder:
    """Records routing from a model's MoE blocks through their hooks. Existing hooks keep
    running (the recorder chains to them). With `lookahead=D` it also records the gate
    look-ahead logits of the next D MoE layers (taking each block's input with a forward
    pre-hook)."""

    def __init__(self, model, lookahead: int = 0):
        from .. import __version__
        from .predict import GateLookahead

        self.blocks = list(model.moe_blocks())
        if not self.blocks:
            raise TraceError("the model has no MoE layers to trace")
        self.layers = [b.layer for b in self.blocks]
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        b0 = self.blocks[0]
        self.num_experts, self.top_k = b0.num_experts, b0.router.top_k
        self.model_type = getattr(model.args, "model_type", "")
        self.version = __version__
        self.ids: list[list[np.ndarray]] = [[] for _ in self.layers]  # per layer: (N, k) per forward
        self.weights: list[list[np.ndarray]] = [[] for _ in self.layers]
        self.forward_tokens: list[int] = []
        self.depth = max(0, min(int(lookahead), len(self.layers) - 1))
        self.gate = GateLookahead.from_model(model) if self.depth else None
        self.look: list[list[np.ndarray]] = [[] for _ in self.layers]  # per layer: (N, D, E) per forward
        self._x: torch.Tensor | None = None
        self._pre = ([b.register_forward_pre_hook(self._stash) for b in self.blocks] if self.depth else [])
        self._prev = [b.hook for b in self.blocks]
        self._expect = 0  # index of the MoE layer the next hook call must come from
        for b, prev in zip(self.blocks, self._prev):
            b.hook = self._make_hook(prev)

    def _stash(self, module, args) -> None:
        x = args[0]
        self._x = x.reshape(-1, x.shape[-1])  # (N, H)

    def _make_hook(self, prev):
        def hook(layer: int, ids: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor) -> None:
            self._record(layer, ids, weights)
            if prev is not None:
                prev(layer, ids, weights, logits)

        return hook

    def _record(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        i = self.index[layer]
        if i == 0:
            if self._expect != 0:  # the previous forward stopped early (an error): drop it
                self._drop_partial()
            self.forward_tokens.append(ids.shape[0])
        elif i != self._expect:
            raise TraceError(f"routing trace: MoE layer {layer} ran out of order")
        self.ids[i].append(ids.to(torch.int16 if self.num_experts < 32768 else torch.int32).numpy().copy())
        self.weights[i].append(weights.detach().to(torch.float16).numpy().copy())
        if self.depth:
            look = np.zeros((ids.shape[0], self.depth, self.num_experts), np.float16)  # (N, D, E)
            for d in range(1, self.depth + 1):
                if i + d < len(self.layers):
                    look[:, d - 1] = self.gate.logits(self._x, i + d).to(torch.float16).numpy()
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
        t = self.trace()
        t.source = path
        t.save(path)
        return t

    def detach(self) -> None:
        for b, prev in zip(self.blocks, self._prev):
            b.hook = prev
        for h in self._pre:
            h.remove()
        self._pre = []
