"""`edgemoe plan` internals: the move path, the size budget (met exactly), the loss
tolerance (met as measured on the calibration text), option parsing."""

from __future__ import annotations

import json
import math
import random

import pytest

from edgemoe.bitwidth.apply import ExpertVariants, plan_bytes, stored_bytes
from edgemoe.bitwidth.plan import Planner, make_plan, parse_loss, parse_target_size, search_loss
from edgemoe.bitwidth.profile import run_profile, write_profile
from edgemoe.checkpoint import load_hf
from edgemoe.errors import EdgeMoEError, InvalidArgument
from edgemoe.evaluate import eval_tokens, perplexity, relative_loss
from edgemoe.store.convert import convert
from edgemoe.store.manifest import read_manifest
from edgemoe.tokenizer import Tokenizer

from bitwidth.helpers import CONTEXT, make_hf, write_calib
from conftest import save_checkpoint, tiny_config

H = I = 128
FORMATS = ["bf16", "int8", "int4", "int4-asym", "int3", "int2"]
BASE = {"int8": 1e-5, "int4": 2e-4, "int4-asym": 1.5e-4, "int3": 8e-4, "int2": 4e-3}


def synthetic_profile(L: int = 4, E: int = 6, seed: int = 0) -> dict:
    """A profile with the store's sizes and random sensitivities that grow as bits fall."""
    rng = random.Random(seed)
    experts = []
    for l in range(L):
        for e in range(E):
            w = rng.lognormvariate(0, 1.2)
            sens = {"bf16": 0.0, **{f: v * w * rng.uniform(0.7, 1.3) for f, v in BASE.items()}}
            experts.append({"layer": l, "expert": e, "tokens": 1, "frequency": 0.25, "sensitivity": sens,
                            "first_order": {f: rng.uniform(-1, 1) * 1e-4 for f in FORMATS}})
    return {
        "format": "edgemoe-expert-profile", "version": 1,
        "shape": {"hidden_size": H, "expert_dim": I, "moe_layers": list(range(L)), "experts_per_layer": E, "top_k": 2},
        "top_format": "bf16",
        "formats": {f: {"bytes": stored_bytes(f, H, I), "bits": 1.0} for f in FORMATS},
        "experts": experts,
        "validation": [],
    }


def test_parse_loss_and_size():
    assert parse_loss("2%") == pytest.approx(0.02)
    assert parse_loss("0.5 %") == pytest.approx(0.005)
    assert parse_loss("0.02") == pytest.approx(0.02)
    assert parse_loss("0") == 0
    for bad in ("abc", "-1%", "2", "1.5", "", "nan%", "2%%"):
        with pytest.raises(InvalidArgument, match="--max-loss"):
            parse_loss(bad)
    assert parse_target_size("300MB") == 300_000_000
    assert parse_target_size("2MiB") == 2 * 1024**2
    for bad in ("big", "0", "-5MB"):
        with pytest.raises(InvalidArgument, match="--target-size"):
            parse_target_size(bad)


def test_path_is_monotone_and_follows_hulls():
    pl = Planner(synthetic_profile())
    n = len(pl.keys)
    assert pl.cum_bytes[0] == n * stored_bytes("bf16", H, I)
    assert all(a > b for a, b in zip(pl.cum_bytes, pl.cum_bytes[1:]))
    assert all(a <= b + 1e-15 for a, b in zip(pl.cum_nll, pl.cum_nll[1:]))
    slopes = [m.slope for m in pl.path]
    assert slopes == sorted(slopes)
    # The end of the path: every expert in the smallest format.
    assert set(pl.formats_at(len(pl.path)).values()) == {"int2"}
    assert pl.smallest == n * stored_bytes("int2", H, I)
    # int4-asym (more bytes than int4) is chosen only where it is on the hull.
    for m in pl.path:
        assert pl.sizes[m.src] > pl.sizes[m.dst]
    # A restricted candidate list is respected.
    pl2 = Planner(synthetic_profile(), candidates=["int8", "int3"])
    assert {m.dst for m in pl2.path} <= {"int8", "int3"}


@pytest.mark.parametrize("seed", range(3))
def test_target_size_is_met_exactly(seed):
    p = synthetic_profile(seed=seed)
    pl = Planner(p)
    n = len(pl.keys)
    rng = random.Random(seed)
    targets = [pl.smallest, n * stored_bytes("int3", H, I), n * stored_bytes("int4", H, I), pl.cum_bytes[0],
               pl.cum_bytes[0] * 10] + [rng.randint(pl.smallest, pl.cum_bytes[0]) for _ in range(20)]
    for t in targets:
        plan = pl.for_size(t)
        assert plan_bytes(plan, H, I) == pl.bytes(plan) <= t
        # Nothing left over that could buy a cheaper-loss format for any expert.
        slack = t - pl.bytes(plan)
        for k, f in plan.items():
            for g in pl.candidates:
                cost = pl.sizes[g] - pl.sizes[f]
                if 0 < cost <= slack:
                    assert pl.sens[k][g] >= pl.sens[k][f]
    # At the size of a uniform plan the planned mix predicts no more loss than it.
    for f in ("int4", "int3"):
        uniform = {k: f for k in pl.keys}
        assert pl.predicted(pl.for_size(pl.bytes(uniform))) <= pl.predicted(uniform)
    with pytest.raises(InvalidArgument, match="below the smallest possible plan"):
        pl.for_size(pl.smallest - 1)


def test_loss_search_finds_the_furthest_position_within_tolerance():
    pl = Planner(synthetic_profile(seed=4))
    calls = []

    def measure(plan):  # the truth: 1.4x the prediction, plus a little interaction
        s = sum(pl.sens[k][f] for k, f in plan.items())
        calls.append(1)
        return math.expm1(1.4 * s + 3 * s * s)

    for tol in (0.001, 0.01, 0.05):
        calls.clear()
        plan, evals = search_loss(pl, tol, measure, max_evals=30)
        assert measure(plan) <= tol
        k = next(i for i in range(len(pl.path) + 1) if pl.formats_at(i) == plan)
        if k < len(pl.path):
            assert measure(pl.formats_at(k + 1)) > tol  # one more move would break it
        assert len(evals) <= 30
    # With a budget of evaluations the result is still within tolerance.
    plan, evals = search_loss(pl, 0.01, measure, max_evals=2)
    assert len(evals) <= 2 and measure(plan) <= 0.01


def test_taylor_estimate_and_top_choice():
    p = synthetic_profile()
    a, b = Planner(p), Planner(p, estimate="taylor")
    k = (0, 0)
    assert b.sens[k]["int2"] == pytest.approx(a.sens[k]["int2"] + p["experts"][0]["first_order"]["int2"])
    c = Planner(p, top="int8")
    assert set(c.formats_at(0).values()) == {"int8"} and "bf16" not in c.candidates
    with pytest.raises(InvalidArgument, match="was not profiled"):
        Planner(p, candidates=["int4-g128"])
    with pytest.raises(InvalidArgument, match="unknown estimate"):
        Planner(p, estimate="guess")


# ----------------------------------------------------------------------------- on a model


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("plan")
    hf = make_hf(d / "hf", tokenizer_dir, seed=3)
    calib = write_calib(d / "calib.txt")
    prof = run_profile(hf, calib, formats=["int8", "int4", "int3", "int2"], context=CONTEXT,
                       calib_tokens=8 * CONTEXT, batch=8, validate=3)
    path = d / "profile.json"
    write_profile(prof, path)
    prof["path"] = str(path)
    return hf, calib, prof


def _calib_loss(hf, calib, formats) -> float:
    model, _ = load_hf(hf, "float32")
    ids = eval_tokens(Tokenizer(hf), calib.read_text(), CONTEXT, 8 * CONTEXT)
    ref = perplexity(model, ids, CONTEXT)["ppl"]
    ExpertVariants(model).attach(formats)
    return relative_loss(perplexity(model, ids, CONTEXT)["ppl"], ref)


def test_max_loss_plan_is_within_tolerance_on_the_calibration_text(profiled, tmp_path):
    hf, calib, prof = profiled
    for tol in (0.01, 0.05):
        plan = make_plan(prof, max_loss=tol, max_evals=8, holdback=0)  # the search sees all the text
        m = plan["meta"]
        assert m["measured_loss"] <= tol and m["objective"] == {"max_loss": tol}
        assert m["search"] and all(s["measured_loss"] is not None for s in m["search"])
        formats = {(l, e): plan["experts"].get(f"{l}.{e}", plan["default"]) for l in range(3) for e in range(4)}
        # Independently measured: the same loss, within the tolerance.
        assert _calib_loss(hf, calib, formats) == pytest.approx(m["measured_loss"], abs=1e-9)
        assert m["expert_bytes"] == plan_bytes(formats, H, I) < m["top_bytes"]
    # A looser tolerance never gives a bigger model.
    small = make_plan(prof, max_loss=0.5, max_evals=6)["meta"]["expert_bytes"]
    assert small <= m["expert_bytes"]


def _part_losses(hf, calib, formats, back_windows) -> dict:
    """Relative losses on the searched windows and the held-back ones, measured apart."""
    model, _ = load_hf(hf, "float32")
    ids = eval_tokens(Tokenizer(hf), calib.read_text(), CONTEXT, 8 * CONTEXT)
    cut = ((len(ids) - 1) // CONTEXT - back_windows) * CONTEXT
    parts = {"search": ids[: cut + 1], "held_back": ids[cut:]}
    ref = {k: perplexity(model, v, CONTEXT)["ppl"] for k, v in parts.items()}
    ExpertVariants(model).attach(formats)
    return {k: relative_loss(perplexity(model, v, CONTEXT)["ppl"], ref[k]) for k, v in parts.items()}


def test_held_back_windows_guard_the_search(profiled, tmp_path):
    """With the default hold-back, a plan is within the tolerance on both the windows it
    was searched on and the windows held back (8 windows: 2 held back), each measured
    independently; the held-out text is measured and reported, never used to choose."""
    hf, calib, prof = profiled
    heldout = tmp_path / "other.txt"
    heldout.write_text(calib.read_text()[::-1])
    plan = make_plan(prof, max_loss=0.02, max_evals=8, heldout=heldout)
    m = plan["meta"]
    assert m["calibration"]["held_back_windows"] == 2
    parts = m["measured_parts"]
    assert set(parts) == {"search", "held_back"} and m["measured_loss"] == max(parts.values()) <= 0.02
    formats = {(l, e): plan["experts"].get(f"{l}.{e}", plan["default"]) for l in range(3) for e in range(4)}
    want = _part_losses(hf, calib, formats, 2)
    for k in parts:
        assert want[k] == pytest.approx(parts[k], abs=1e-9)
    assert all(set(s) >= {"search_loss", "held_back_loss"} for s in m["search"])
    h = m["heldout"]
    assert h["text"] == str(heldout.resolve()) and h["loss"] == pytest.approx(h["ppl"] / h["reference_ppl"] - 1)
    with pytest.raises(InvalidArgument, match="--holdback"):
        make_plan(prof, max_loss=0.02, holdback=1.0)
    with pytest.raises(InvalidArgument, match="--no-verify"):
        make_plan(prof, max_loss=0.02, verify=False, heldout=heldout)


def test_size_plan_converts_to_exactly_its_bytes(profiled, tmp_path):
    hf, calib, prof = profiled
    target = 12 * stored_bytes("int3", H, I) + 5000  # not a multiple of anything
    plan = make_plan(prof, target_size=target, verify=False)
    assert plan["meta"]["expert_bytes"] <= target and plan["meta"]["measured_loss"] is None
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    convert(hf, tmp_path / "conv", plan=path)
    assert read_manifest(tmp_path / "conv").expert_bytes == plan["meta"]["expert_bytes"]
    with pytest.raises(InvalidArgument, match="below the smallest possible plan"):
        make_plan(prof, target_size=12 * stored_bytes("int2", H, I) - 1)
    with pytest.raises(InvalidArgument, match="exactly one of"):
        make_plan(prof, max_loss=0.01, target_size=target)
    with pytest.raises(InvalidArgument, match="exactly one of"):
        make_plan(prof)


def test_plan_needs_the_profiled_model(profiled, tmp_path, tokenizer_dir):
    hf, calib, prof = profiled
    text = tmp_path / "changed.txt"
    text.write_text(calib.read_text() + "more")
    moved = dict(prof, calibration=dict(prof["calibration"], text=str(text)))
    with pytest.raises(EdgeMoEError, match="calibration text changed"):
        make_plan(moved, max_loss=0.01)
    save_checkpoint(tiny_config("mixtral", hidden_size=64, intermediate_size=128), tmp_path / "wrong", tokenizer_dir)
    with pytest.raises(EdgeMoEError, match="does not match the profile"):
        make_plan(prof, max_loss=0.01, model_dir=tmp_path / "wrong")
