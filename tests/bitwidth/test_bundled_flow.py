"""The bundled trained model end to end: profile, plan within a tolerance, convert the
mixed-bit model, and run it offloaded with the tokens of the same model in RAM."""

from __future__ import annotations

import json

import pytest

import edgemoe
from edgemoe import assets
from edgemoe.api import Engine
from edgemoe.bitwidth.apply import load_planned
from edgemoe.bitwidth.plan import make_plan
from edgemoe.bitwidth.profile import run_profile
from edgemoe.store.convert import convert
from edgemoe.store.manifest import read_manifest
from edgemoe.tokenizer import Tokenizer

from cli.helpers import run_cli

PROMPTS = ["def fibonacci(n):", "import os\n\nclass Config:"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundled")
    prof = run_profile(assets.MODEL_DIR, calib_tokens=2048, validate=4)
    # All experts quantized (top int8), so the store and RAM compute with the same kernels.
    plan = make_plan(prof, max_loss=0.02, top="int8", max_evals=5)
    path = d / "plan.json"
    path.write_text(json.dumps(plan))
    return d, prof, plan, path


def test_profile_of_the_bundled_model(planned):
    _, prof, _, _ = planned
    assert prof["top_format"] == "bf16" and len(prof["experts"]) == 64
    v = prof["validation"][0]
    assert v["format"] == "int2" and len(v["measured"]) == 4
    # On a trained model the Taylor estimate ranks single-expert losses well.
    assert v["taylor"]["pearson"] > 0.8


def test_planned_model_is_within_tolerance_and_smaller(planned):
    _, prof, plan, _ = planned
    m = plan["meta"]
    assert m["measured_loss"] <= 0.02
    assert m["expert_bytes"] < 64 * prof["formats"]["int4"]["bytes"]  # smaller than uniform int4
    assert all(f.startswith("int") for f in m["counts"])


def test_converted_mixed_bits_offloaded_match_in_ram(planned):
    d, _, plan, path = planned
    out = d / "conv"
    convert(assets.MODEL_DIR, out, plan=path)
    assert read_manifest(out).expert_bytes == plan["meta"]["expert_bytes"]
    model, _, _ = load_planned(assets.MODEL_DIR, path, "float32")
    ram = Engine(model, Tokenizer(assets.MODEL_DIR, eos_token_ids=model.args.eos_ids), assets.MODEL_DIR)
    want = [ram.generate(p, max_tokens=12, ignore_eos=True).token_ids for p in PROMPTS]
    # float32 resident weights take 3.7 MB, the KV cache and workspace 2.3 MB; the rest of 6.5 MB
    # holds a few experts.
    engine = edgemoe.load(out, dtype="float32", memory="6.5MB", cache_policy="lru")
    try:
        got = [engine.generate(p, max_tokens=12, ignore_eos=True) for p in PROMPTS]
    finally:
        engine.close()
    assert [r.token_ids for r in got] == want
    assert got[0].stats.extra["misses"] > 0 and got[0].stats.extra["evictions"] > 0


def test_eval_cli_on_the_bundled_model():
    r = run_cli("eval", "--max-tokens", 512, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["tokens"] == 512 and d["expert_bytes"] == 64 * 3 * 128 * 256 * 2 and d["kind"] == "hf"
    assert 20 < d["ppl"] < 200 and d["dtype"] == "float32"
