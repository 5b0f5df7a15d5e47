"""The planner treats experts sharing one blob (a merged group) as one unit, and plans for
expected bytes read per token at an expert cache size (edgemoe.bitwidth.traffic): by
hand on synthetic profiles, and merge -> profile -> plan -> convert --plan end to end."""

from __future__ import annotations

import copy
import math

import pytest

from edgemoe.bitwidth.apply import stored_bytes
from edgemoe.bitwidth.plan import Planner, make_plan
from edgemoe.bitwidth.traffic import first_within, traffic, unit_frequencies
from edgemoe.errors import EdgeMoEError, InvalidArgument

from bitwidth.test_plan import H, I, synthetic_profile
from cli.helpers import assert_clean_error, run_cli


def grouped_profile() -> dict:
    """Layer 0: experts 1 and 2 share expert 0's blob (a merged group); the rest alone."""
    p = synthetic_profile(L=2, E=4)
    for x in p["experts"]:
        if x["layer"] == 0 and x["expert"] in (1, 2):
            x["shares"] = [0, 0]
    return p


def test_a_group_is_one_unit():
    p = grouped_profile()
    pl = Planner(p)
    assert len(pl.keys) == 6 and pl.members[(0, 0)] == [(0, 0), (0, 1), (0, 2)]
    by = {(x["layer"], x["expert"]): x for x in p["experts"]}
    for f in ("int4", "int2"):  # the unit's sensitivity is its members' sum
        assert pl.sens[(0, 0)][f] == pytest.approx(pl.scale * sum(by[(0, e)]["sensitivity"][f] for e in range(3)))
    assert pl.cum_bytes[0] == 6 * stored_bytes("bf16", H, I)  # the group's blob once
    for k in range(len(pl.path) + 1):
        f = pl.formats_at(k)
        assert len(f) == 8 and f[(0, 0)] == f[(0, 1)] == f[(0, 2)]
        assert pl.bytes(f) == pl.cum_bytes[k]
    # A size between two uniform plans gives a mix; the group still gets one format.
    target = 6 * (stored_bytes("int8", H, I) + stored_bytes("int3", H, I)) // 2
    f = pl.for_size(target)
    assert len(set(f.values())) > 1 and f[(0, 0)] == f[(0, 1)] == f[(0, 2)]
    assert pl.bytes(f) <= target
    plan = make_plan(p, target_size=target, verify=False)
    assert plan["meta"]["expert_bytes"] == pl.bytes(f) and plan["meta"]["blobs"] == 6


def test_traffic_by_hand():
    sizes = {(0, 0): 100, (0, 1): 50, (1, 0): 80, (1, 1): 10}
    freq = {(0, 0): 0.9, (0, 1): 0.5, (1, 0): 0.4, (1, 1): 0.2}
    # Cache 160: (0,0) fits (60 left), (0,1) fits (10 left), (1,0) does not, (1,1) fits (0 left).
    t = traffic(sizes, freq, 160)
    assert t.cached_units == 3 and t.cached_bytes == 160
    assert t.bytes_per_token == pytest.approx(0.4 * 80)
    assert t.hit_rate == pytest.approx((0.9 + 0.5 + 0.2) / 2.0) and t.needed_per_token == pytest.approx(2.0)
    assert traffic(sizes, freq, 0).bytes_per_token == pytest.approx(90 + 25 + 32 + 2)
    assert traffic(sizes, freq, 10**6).bytes_per_token == 0
    # A group is needed when any member is: the members' sum, capped at 1.
    p = grouped_profile()
    for x in p["experts"]:
        x["frequency"] = 0.4
    f = unit_frequencies(p, Planner(p).members)
    assert f[(0, 0)] == 1.0 and f[(1, 3)] == pytest.approx(0.4)
    # first_within: bisection on a monotone sequence.
    seq = [9, 7, 7, 4, 2, 1]
    assert first_within(5, lambda i: seq[i], 4) == 3 and first_within(5, lambda i: seq[i], 0.5) is None


def test_bytes_per_token_plan():
    p = grouped_profile()
    pl = Planner(p)
    cache = 2 * stored_bytes("bf16", H, I)
    top = make_plan(p, max_loss=0.0, cache_size=cache, verify=False)["meta"]["traffic"]
    assert top["bytes_per_token"] > 0
    want = top["bytes_per_token"] / 3
    meta = make_plan(p, bytes_per_token=want, cache_size=cache, verify=False)["meta"]
    got = meta["traffic"]["bytes_per_token"]
    assert got <= want and meta["objective"] == {"bytes_per_token": want, "cache_size": cache}
    # The position before the chosen one reads more: the plan gives up no more bits than it must.
    freq = unit_frequencies(p, pl.members)
    bpt = [traffic({u: pl.sizes[pl.formats_at(k)[u]] for u in pl.keys}, freq, cache).bytes_per_token
           for k in range(len(pl.path) + 1)]
    k = next(i for i in range(len(bpt)) if math.isclose(bpt[i], got) and pl.bytes(pl.formats_at(i)) ==
             meta["expert_bytes"])
    assert k == 0 or bpt[k - 1] > want
    with pytest.raises(InvalidArgument, match="even every expert in its smallest format"):
        make_plan(p, bytes_per_token=0, cache_size=0, verify=False)
    with pytest.raises(InvalidArgument, match="needs --cache-size"):
        make_plan(p, bytes_per_token=1000, verify=False)
    with pytest.raises(InvalidArgument, match="exactly one of"):
        make_plan(p, max_loss=0.01, bytes_per_token=1000, cache_size=1, verify=False)


def test_profile_shares_are_checked(tmp_path):
    import json

    from edgemoe.bitwidth.profile import read_profile

    for bad in ([0, 9], [0, 1], "0,0"):
        p = copy.deepcopy(grouped_profile())
        p["experts"][1]["shares"] = bad
        path = tmp_path / "p.json"
        path.write_text(json.dumps(p))
        with pytest.raises(EdgeMoEError, match="shares"):
            read_profile(path)


def test_cli_objectives(tmp_path):
    path = tmp_path / "p.json"
    import json

    path.write_text(json.dumps(grouped_profile()))
    out = str(tmp_path / "plan.json")
    assert_clean_error(run_cli("plan", str(path), "--bytes-per-token", "lots", "--cache-size", "1MB", "-o", out),
                       "--bytes-per-token: cannot parse size 'lots'")
    proc = run_cli("plan", str(path), "--bytes-per-token", "20KB", "--cache-size", "100KB", "-o", out,
                   "--no-verify", "--no-plot", "--json")
    assert proc.returncode == 0, proc.stderr
    t = json.loads(proc.stdout)["traffic"]
    assert t["bytes_per_token"] <= 20_000 and "read (expected)" in proc.stderr


def test_merged_group_one_blob_through_plan_and_convert(tmp_path, tokenizer_dir):
    """merge -> profile -> plan (a size that forces a mix of formats) -> convert --plan:
    every merged group gets one format and one blob, and the plan's bytes are the store's."""
    from edgemoe.bitwidth.profile import run_profile
    from edgemoe.compress.merge import merge
    from edgemoe.store.convert import convert
    from edgemoe.store.manifest import read_manifest

    from store.helpers import make_checkpoint

    src = make_checkpoint(tmp_path / "hf", "mixtral", tokenizer_dir, num_hidden_layers=2, hidden_size=64,
                          intermediate_size=128)
    merged = tmp_path / "m"
    r = merge(src, merged, experts_per_layer=2, calib_tokens=512, context=64)
    prof = run_profile(merged, None, formats=["int8", "int2"], calib_tokens=512, context=64, validate=0)
    owners = {(x["layer"], x["expert"]): tuple(x.get("shares") or (x["layer"], x["expert"])) for x in prof["experts"]}
    for layer, groups in r["groups"].items():
        for g in groups:
            assert len({owners[(int(layer), e)] for e in g}) == 1
    pl = Planner(prof)
    assert len(pl.keys) == 4  # 2 layers x 2 distinct experts
    target = (pl.sizes["int8"] + pl.sizes["int2"]) * 2
    plan = make_plan(prof, target_size=target, verify=False)
    conv = tmp_path / "c"
    convert(merged, conv, plan=plan_file(plan, tmp_path))
    m = read_manifest(conv)
    fmt = {e.key: e.format for e in m.experts}
    assert len(set(fmt.values())) > 1  # a mix
    for layer, groups in r["groups"].items():
        for g in groups:
            assert len({fmt[(int(layer), e)] for e in g}) == 1
            assert {m.table()[(int(layer), e)].blob_key for e in g} == {m.table()[(int(layer), g[0])].blob_key}
    assert m.expert_bytes == plan["meta"]["expert_bytes"]


def plan_file(plan: dict, d) -> str:
    import json

    path = d / "plan.json"
    path.write_text(json.dumps(plan))
    return str(path)


def test_margin_holds_back_part_of_the_tolerance():
    p = synthetic_profile()
    full = make_plan(p, max_loss=0.02, margin=0, verify=False)["meta"]
    held = make_plan(p, max_loss=0.02, margin=0.5, verify=False)["meta"]
    assert held["margin"] == {"share": 0.5, "calibration_tolerance": 0.01}
    assert held["predicted_loss"] <= 0.01 < full["predicted_loss"] <= 0.02
    assert held["expert_bytes"] > full["expert_bytes"]
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(InvalidArgument, match="--margin"):
            make_plan(p, max_loss=0.02, margin=bad, verify=False)
