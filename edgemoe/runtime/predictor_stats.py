"""Fitted predictor statistics and their file, `predictor.npz` (see `PredictorStats`):
what `edgemoe fit-predictor` learns from routing traces (runtime/fit.py) and the fitted
predictors (predict.py) read at run time: per-layer frequency priors, EdgeMoE's path
tables with their Dirichlet back-off, and the weights of the combined predictor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeMoEError
from .npzfile import load_npz, save_npz

PREDICTOR_FILE = "predictor.npz"
PREDICTOR_FORMAT = "edgemoe-expert-predictor"
PREDICTOR_VERSION = 1


class PredictorError(EdgeMoEError):
    pass


def sorted_rows(ids: np.ndarray) -> np.ndarray:
    """Each row's expert ids in ascending order (int16): the path tables' key form."""
    return np.sort(np.asarray(ids, dtype=np.int16), axis=-1)


@dataclass
class PathTable:
    """Counts for one (distance, target) pair: key rows -> (inclusion counts (E,), tokens)."""

    keys: np.ndarray  # (K, w) int16, each half sorted
    counts: np.ndarray  # (K, E) float32
    n: np.ndarray  # (K,) int32

    def lookup(self) -> dict[tuple, int]:
        return {tuple(row): i for i, row in enumerate(self.keys.tolist())}

    @classmethod
    def count(cls, keys: np.ndarray, onehot: np.ndarray) -> "PathTable":
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        counts = np.zeros((len(uniq), onehot.shape[1]), np.float32)
        np.add.at(counts, inv, onehot)
        return cls(uniq.astype(np.int16), counts, np.bincount(inv, minlength=len(uniq)).astype(np.int32))


class PredictorStats:
    """What fitting learns from routing traces: frequency priors, path tables for each
    (distance, target) and the combination weights. Saved as predictor.npz:

        header    uint8 JSON: {"format", "version", "model_type", "moe_layers", "num_experts",
                  "top_k", "max_distance", "beta", "alpha": [[...]], "tau": [[...]],
                  "fitted_on": [{"source", "tokens"}], "created_by"}
                  alpha/tau are indexed [distance - 1][target position]
        freq      float32 (L, E)
        t1_index  int32 (R1, 2)      (distance, target) of each one-layer row
        t1_keys   int16 (R1, k)      expert set at position target - distance
        t1_counts float32 (R1, E);  t1_n int32 (R1,)
        t2_index, t2_keys (R2, 2k: sets at target - distance - 1 and target - distance),
        t2_counts, t2_n              the same for the two-layer table
    """

    def __init__(self, header: dict, freq: np.ndarray, t1: dict, t2: dict, source: str | Path = "<memory>"):
        self.header = header
        self.freq = freq  # (L, E)
        self.t1: dict[tuple[int, int], PathTable] = t1
        self.t2: dict[tuple[int, int], PathTable] = t2
        self.source = source
        self._lookups: dict = {}

    # --- facts

    @property
    def moe_layers(self) -> list[int]:
        return list(self.header["moe_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.header["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.header["top_k"])

    @property
    def max_distance(self) -> int:
        return int(self.header["max_distance"])

    @property
    def beta(self) -> float:
        return float(self.header["beta"])

    def alpha(self, d: int, j: int) -> float:
        return float(self.header["alpha"][d - 1][j])

    def tau(self, d: int, j: int) -> float:
        return float(self.header["tau"][d - 1][j])

    def check_model(self, moe_layers: list[int], num_experts: int, top_k: int) -> None:
        if list(moe_layers) != self.moe_layers or num_experts != self.num_experts or top_k != self.top_k:
            raise PredictorError(
                f"{self.source}: fitted on a different model (MoE layers {self.moe_layers}, {self.num_experts} "
                f"experts, top-{self.top_k}; this model: {list(moe_layers)}, {num_experts}, top-{top_k}); "
                "re-run 'edgemoe fit-predictor'")

    # --- scoring

    def _table(self, which: int, d: int, j: int) -> tuple[PathTable | None, dict]:
        tables = self.t1 if which == 1 else self.t2
        t = tables.get((d, j))
        if t is None:
            return None, {}
        key = (which, d, j)
        if key not in self._lookups:
            self._lookups[key] = t.lookup()
        return t, self._lookups[key]

    def table_probs(self, j: int, d: int, src: np.ndarray, prev: np.ndarray | None) -> np.ndarray:
        """(N, E) smoothed path-table probabilities for target j at distance d, from the
        expert sets (N, k) at positions j-d (src) and j-d-1 (prev, None at the first layer)."""
        p = np.repeat(self.freq[j][None, :], len(src), axis=0)  # (N, E): the frequency prior
        beta = self.beta
        s1 = sorted_rows(src)
        for which, keys in ((1, s1), (2, np.concatenate([sorted_rows(prev), s1], axis=1) if prev is not None else None)):
            table, look = self._table(which, d, j)
            if table is None or keys is None:
                continue
            idx = np.fromiter((look.get(row, -1) for row in map(tuple, keys.tolist())), np.int64, len(keys))
            m = idx >= 0
            if m.any():
                i = idx[m]
                p[m] = (table.counts[i] + beta * p[m]) / (table.n[i][:, None] + beta)
        return p

    def table_probs_one(self, j: int, d: int, src: list, prev: list | None) -> list[float]:
        """table_probs for one token (expert id lists), in plain Python: the decode path."""
        if not hasattr(self, "_freq_list"):
            self._freq_list = self.freq.tolist()
            self._rows: dict = {}
        p = self._freq_list[j]
        beta = self.beta
        s1 = tuple(sorted(src))
        for which, key in ((1, s1), (2, tuple(sorted(prev)) + s1 if prev is not None else None)):
            if key is None:
                continue
            table, look = self._table(which, d, j)
            i = look.get(key) if table is not None else None
            if i is None:
                continue
            row = self._rows.get((which, d, j, i))
            if row is None:
                row = self._rows[(which, d, j, i)] = (table.counts[i].tolist(), float(table.n[i]))
            counts, n = row
            p = [(c + beta * q) / (n + beta) for c, q in zip(counts, p)]
        return p

    # --- storage

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary file, then rename)."""
        arrays = {"freq": self.freq.astype(np.float32)}
        for name, tables, width in (("t1", self.t1, self.top_k), ("t2", self.t2, 2 * self.top_k)):
            items = sorted(tables.items())
            idx = [np.full((len(t.n), 2), dj, np.int32) for dj, t in items]
            arrays[f"{name}_index"] = np.concatenate(idx) if idx else np.zeros((0, 2), np.int32)
            arrays[f"{name}_keys"] = (np.concatenate([t.keys for _, t in items]) if items
                                      else np.zeros((0, width), np.int16))
            arrays[f"{name}_counts"] = (np.concatenate([t.counts for _, t in items]) if items
                                        else np.zeros((0, self.num_experts), np.float32))
            arrays[f"{name}_n"] = np.concatenate([t.n for _, t in items]) if items else np.zeros(0, np.int32)
        save_npz(path, self.header, arrays)

    @classmethod
    def load(cls, path: str | Path) -> "PredictorStats":
        """Read and check a predictor.npz (PredictorError names what is wrong)."""
        path = Path(path)
        need = {"freq"} | {f"t{w}_{p}" for w in (1, 2) for p in ("index", "keys", "counts", "n")}
        header, arrays = load_npz(path, what="expert predictor", noun="predictor", fmt=PREDICTOR_FORMAT,
                                  versions=(PREDICTOR_VERSION,), required=need, error=PredictorError,
                                  hint="; fit one with 'edgemoe fit-predictor'")
        try:
            L, E, k, D = len(header["moe_layers"]), int(header["num_experts"]), int(header["top_k"]), \
                int(header["max_distance"])
            float(header["beta"])
            ok = (arrays["freq"].shape == (L, E) and np.shape(header["alpha"]) == (D, L)
                  and np.shape(header["tau"]) == (D, L))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise PredictorError(f"{path}: predictor header and arrays do not agree")
        tables = []
        for w, width in ((1, k), (2, 2 * k)):
            index, keys, counts, n = (arrays[f"t{w}_{p}"] for p in ("index", "keys", "counts", "n"))
            R = len(n)
            if (index.shape != (R, 2) or keys.shape != (R, width) or counts.shape != (R, E)
                    or (R and (keys.min() < 0 or keys.max() >= E))):
                raise PredictorError(f"{path}: table t{w} is malformed")
            out = {}
            if R:
                bounds = np.flatnonzero(np.any(np.diff(index, axis=0) != 0, axis=1)) + 1
                for a, b in zip(np.r_[0, bounds], np.r_[bounds, R]):
                    d, j = (int(v) for v in index[a])
                    out[(d, j)] = PathTable(keys[a:b].astype(np.int16), counts[a:b].astype(np.float32),
                                            n[a:b].astype(np.int32))
            tables.append(out)
        return cls(header, arrays["freq"].astype(np.float32), tables[0], tables[1], path)
