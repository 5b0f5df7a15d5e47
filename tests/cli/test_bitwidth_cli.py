"""profile -> plan -> convert -> generate / eval from the command line, one command each,
and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from edgemoe.cli import main as cli_main

from bitwidth.helpers import CONTEXT, make_hf, write_calib
from cli.helpers import run_cli


@pytest.fixture(scope="module")
def flow(tmp_path_factory, tokenizer_dir):
    """Profile and plan a tiny checkpoint through subprocesses, as a user would."""
    d = tmp_path_factory.mktemp("flow")
    hf = make_hf(d / "hf", tokenizer_dir, seed=1)
    calib = write_calib(d / "calib.txt")
    prof = d / "profile.json"
    r = run_cli("profile", hf, "--calib", calib, "-o", prof, "--context", CONTEXT, "--calib-tokens", 6 * CONTEXT,
                "--formats", "int8,int4,int3,int2", "--validate", 3, "-t", 1)
    assert r.returncode == 0, r.stderr
    return d, hf, calib, prof, r


def test_profile_writes_json_and_heatmap(flow):
    d, hf, calib, prof, r = flow
    data = json.loads(prof.read_text())
    assert data["calibration"]["tokens"] == 6 * CONTEXT and len(data["experts"]) == 12
    assert (d / "profile.png").stat().st_size > 1000
    assert "check against 3 full measurements at int2" in r.stderr and f"wrote {prof}" in r.stderr


def test_plan_convert_generate_eval(flow, tmp_path):
    d, hf, calib, prof, _ = flow
    plan = tmp_path / "plan.json"
    # --holdback 0: the loss measured is then on the whole calibration text, which eval checks below.
    r = run_cli("plan", prof, "--max-loss", "5%", "-o", plan, "-t", 1, "--json", "--holdback", 0)
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)
    assert meta["measured_loss"] <= 0.05 and "expected size" in r.stderr and "expected loss" in r.stderr
    assert (tmp_path / "plan.png").stat().st_size > 1000
    assert json.loads(plan.read_text())["meta"] == meta
    out = tmp_path / "conv"
    r = run_cli("convert", hf, out, "--plan", plan, "--json")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(-(-e["size"] // 4096) * 4096 for e in manifest["experts"]) == meta["expert_bytes"]
    r = run_cli("generate", out, "--prompt", "def add", "-n", 5, "--memory", "3MB", "--json", "--ignore-eos", "-t", 1)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) == 5
    # eval: the converted model under a budget, and the source with the plan applied in RAM.
    r = run_cli("eval", out, "--text", calib, "--context", CONTEXT, "--max-tokens", 6 * CONTEXT, "--json",
                "--memory", "3MB", "-t", 1)
    assert r.returncode == 0, r.stderr
    conv = json.loads(r.stdout)
    assert conv["tokens"] == 6 * CONTEXT and conv["expert_bytes"] == meta["expert_bytes"]
    assert conv["kind"] == "converted" and conv["runtime"]["budget_bytes"] == 3_000_000
    r = run_cli("eval", hf, "--plan", plan, "--text", calib, "--context", CONTEXT, "--max-tokens", 6 * CONTEXT,
                "--json", "-t", 1)
    assert r.returncode == 0, r.stderr
    ram = json.loads(r.stdout)
    assert ram["ppl"] == pytest.approx(conv["ppl"], rel=1e-6) and ram["expert_bytes"] == conv["expert_bytes"]
    # The calibration loss the planner measured is the one eval reports.
    r = run_cli("eval", hf, "--text", calib, "--context", CONTEXT, "--max-tokens", 6 * CONTEXT, "--json", "-t", 1)
    base = json.loads(r.stdout)
    assert base["expert_bytes"] == 12 * 3 * 128 * 128 * 4  # fp32 checkpoint
    assert ram["ppl"] / base["ppl"] - 1 == pytest.approx(meta["measured_loss"], abs=1e-6)


def test_target_size_plan(flow, tmp_path):
    _, hf, _, prof, _ = flow
    plan = tmp_path / "plan.json"
    r = run_cli("plan", prof, "--target-size", "700KB", "-o", plan, "--no-verify", "--no-plot", "--json")
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)
    assert meta["expert_bytes"] <= 700_000 and meta["measured_loss"] is None
    assert not (tmp_path / "plan.png").exists()


def _error(capsys, *argv) -> str:
    try:
        code = cli_main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code != 0, err
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.startswith("edgemoe: error:") or l.startswith("edgemoe plan: error:")
             or l.startswith("edgemoe profile: error:") or l.startswith("edgemoe eval: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_inputs(flow, tmp_path, capsys):
    d, hf, calib, prof, _ = flow
    out = tmp_path / "p.json"
    assert "profile not found" in _error(capsys, "plan", tmp_path / "nope.json", "--max-loss", "2%", "-o", out)
    assert "--max-loss" in _error(capsys, "plan", prof, "--max-loss", "abc", "-o", out)
    assert "--max-loss" in _error(capsys, "plan", prof, "--max-loss", "-1%", "-o", out)
    assert "exactly one of" in _error(capsys, "plan", prof, "-o", out)
    assert "exactly one of" in _error(capsys, "plan", prof, "--max-loss", "2%", "--target-size", "1MB", "-o", out)
    assert "below the smallest possible plan" in _error(capsys, "plan", prof, "--target-size", "10KB", "-o", out)
    assert "--target-size" in _error(capsys, "plan", prof, "--target-size", "lots", "-o", out)
    assert "was not profiled" in _error(capsys, "plan", prof, "--max-loss", "2%", "--formats", "int3-asym", "-o", out)
    assert "not valid JSON" in _error(capsys, "plan", calib, "--max-loss", "2%", "-o", out)
    (tmp_path / "other.json").write_text('{"version": 1, "default": "int4"}')
    assert "not an edgemoe expert profile" in _error(capsys, "plan", tmp_path / "other.json", "--max-loss", "2%", "-o", out)
    assert not out.exists()
    assert "calibration text file not found" in _error(capsys, "profile", hf, "--calib", tmp_path / "no.txt", "-o", out)
    assert "unknown expert format 'int9'" in _error(capsys, "profile", hf, "--formats", "int9", "-o", out)
    assert "--calib-tokens" in _error(capsys, "profile", hf, "--calib-tokens", "many", "-o", out)
    assert "required: -o" in _error(capsys, "profile", hf)
    assert "--threads must be at least 1" in _error(capsys, "profile", hf, "-t", "0", "-o", out)
    assert "--threads must be at least 1" in _error(capsys, "plan", prof, "--max-loss", "2%", "-t", "0", "-o", out)
    assert "evaluation text file not found" in _error(capsys, "eval", hf, "--text", tmp_path / "no.txt")
    assert "does not exist" in _error(capsys, "eval", tmp_path / "nodir")
    assert "fewer than one window" in _error(capsys, "eval", hf, "--text", _short(tmp_path))


def _short(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("def f(): pass\n")
    return p
