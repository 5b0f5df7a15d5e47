"""Several sequences decoded in one forward, each at its own position.

A batched forward normally shares one cache position across its rows. Serving several
requests at once needs the opposite: row b continues sequence b, which has its own
cache (a KVCache or MLACache of batch 1, as a single-sequence run builds) and its own
length. A layer handed a `RowCaches` instead of a cache

- computes its projections for all rows at once (one read of each weight for B rows),
- rotates row b's queries and keys at row b's positions (`rope`, `temperature`),
- then, row by row, appends row b's new keys and values to row b's cache and attends
  over that cache with the mask it would use alone (window, chunk, sinks): no padding,
  no mask between rows, so every row computes exactly what its sequence alone computes,
  given the same projections.

Everything else in a decoder layer (norms, the MoE block) is per token already, so a
batch of rows is one call there: the weights, and in an MoE block the experts the rows
share, are read once per step for all of them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .rope import RoPE, temperature_scales


class RowCaches:
    """The caches of one layer for B sequences decoded together, one per batch row.

    `starts` is each row's position before this forward (its cache offset when the
    object was made: build one per layer per forward, see `row_caches`). `memo` is shared
    by the layers of one forward, so that position tables are gathered once."""

    def __init__(self, rows: Sequence, memo: dict | None = None):
        self.rows = list(rows)
        self.starts = [c.offset for c in self.rows]
        self.memo = {} if memo is None else memo

    def __len__(self) -> int:
        return len(self.rows)

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) positions of the new tokens of every row."""
        key = ("pos", tuple(self.starts), T)
        if key not in self.memo:
            self.memo[key] = torch.tensor(self.starts)[:, None] + torch.arange(T)[None, :]
        return self.memo[key]

    def rope(self, rope, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q (B, heads, T, D) and k (B, kv, T, D) row by row at each row's positions."""
        T = q.shape[2]
        if type(rope).__call__ is RoPE.__call__:  # one table for every position: gather rows from it
            key = ("rope", id(rope), q.dtype, tuple(self.starts), T)  # layers usually share one RoPE
            if key not in self.memo:
                pos = self.positions(T)  # (B, T)
                cos, sin = rope.tables(int(pos.max()) + 1, q.dtype)
                self.memo[key] = (rope, cos[pos][:, None], sin[pos][:, None])  # (B, 1, T, D); rope kept alive
            _, cos, sin = self.memo[key]
            return rope.apply(q, cos, sin), rope.apply(k, cos, sin)
        # Tables chosen by position (LongRoPE) or any other rotation: one call per row.
        parts = [rope(q[b : b + 1], k[b : b + 1], start) for b, start in enumerate(self.starts)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def temperature(self, T: int, temperature: tuple[float, float]) -> torch.Tensor:
        """(B, 1, T, 1) fp32 query scales of attention temperature tuning (Llama 4)."""
        scales = torch.stack([temperature_scales(start, T, *temperature) for start in self.starts])  # (B, T)
        return scales[:, None, :, None]


def row_caches(caches: Sequence[Sequence]) -> list[RowCaches]:
    """Per-layer RowCaches for a batch: caches[b] is sequence b's list of layer caches."""
    memo: dict = {}
    return [RowCaches(layer, memo) for layer in zip(*caches)]
