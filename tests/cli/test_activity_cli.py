"""Expert-activity numbers on a hand-made trace, and the `edgemoe activity` command."""

import json

import numpy as np
import pytest

from edgemoe.expert_activity import activation_share, activity_summary, path_matrix, top_path_share
from edgemoe.runtime.trace import RoutingTrace

from .helpers import assert_clean_error, run_cli


def make_trace() -> RoutingTrace:
    # 4 tokens, 2 MoE layers, top-2 of 4 experts; layer 1 picks (0, 1) whenever layer 0 picked (2, 3).
    ids = np.array([[[0, 1], [2, 3]], [[0, 1], [2, 3]], [[2, 3], [0, 1]], [[0, -1], [2, 3]]], np.int16)
    header = {"format": "edgemoe-routing-trace", "version": 2, "model_type": "mixtral", "moe_layers": [0, 1],
              "num_experts": 4, "top_k": 2, "tokens": 4, "forwards": 1, "lookahead_depth": 0}
    return RoutingTrace(header, ids, np.full(ids.shape, 0.5, np.float16), np.array([4], np.int32))


def test_shares_paths_and_skew_by_hand():
    t = make_trace()
    assert activation_share(t).tolist() == [[0.75, 0.5, 0.25, 0.25], [0.25, 0.25, 0.75, 0.75]]
    m = path_matrix(t, 1)
    assert m[2].tolist() == [0.5, 0.5, 0.0, 0.0]  # after expert 2: experts 0 and 1, equally
    assert m[0].tolist() == [0.0, 0.0, 0.5, 0.5]
    # 14 pairs over 16 cells: (0,2) and (0,3) three times, (1,2) and (1,3) twice, four cells once;
    # the top 3 cells (20% of 16) hold 3 + 3 + 2.
    assert top_path_share(t, 1) == pytest.approx(8 / 14)
    # The cache's view (what Belady replays) leaves out the slot adaptive gating dropped.
    assert t.requests() == [(0, frozenset({0, 1, 2, 3})), (1, frozenset({0, 1, 2, 3}))]
    s = activity_summary(t)
    assert s["entropy_bits"][0] == pytest.approx(1.842, abs=1e-3)  # p = 3/7, 2/7, 1/7, 1/7


def test_activity_command(tmp_path):
    path = tmp_path / "t.npz"
    make_trace().save(path)
    proc = run_cli("activity", path, "-o", tmp_path / "a.png", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["png"] and (tmp_path / "a.png").stat().st_size > 1000
    assert out["activation_share"][1] == [0.25, 0.25, 0.75, 0.75]
    assert RoutingTrace.load(path).ids.min() == -1  # a dropped slot survives the round trip
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    assert_clean_error(run_cli("activity", bad), "bad.npz")
