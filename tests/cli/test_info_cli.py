"""`edgemoe info` (issue 17, section 6): what a Hugging Face or converted directory holds,
checked against the files themselves and against what the runtime accepts."""

from __future__ import annotations

import json

import pytest

from edgemoe import assets
from edgemoe.cli.info import model_info
from edgemoe.store.tensorfile import read_header

from .helpers import assert_clean_error, run_cli


def checkpoint_numel(path) -> int:
    infos, _ = read_header(path / "model.safetensors")
    return sum(i.nbytes // i.dtype.itemsize for i in infos.values())


def test_hf_directory():
    info = model_info(assets.MODEL_DIR)
    config = json.loads((assets.MODEL_DIR / "config.json").read_text())
    assert info["kind"] == "hf" and info["family"] == "mixtral"
    assert (info["layers"], info["experts_per_layer"], info["top_k"]) == (
        config["num_hidden_layers"], config["num_local_experts"], config["num_experts_per_tok"])
    p = info["params"]
    assert p["total"] == checkpoint_numel(assets.MODEL_DIR)  # tied embeddings: one copy in the file and the count
    assert p["experts"] == 8 * 8 * 3 * 128 * 256 and p["total"] == p["resident"] + p["experts"]
    assert p["active"] == p["resident"] + 8 * 2 * 3 * 128 * 256
    assert info["bits_histogram"] == [{"bits": 16.0, "experts": 64, "formats": ["bf16"]}]
    assert info["memory"]["ctx_size"] == 256 and info["memory"]["kv_bytes"] == 256 * info["memory"]["kv_bytes_per_token"]
    assert info["predictor"]["fitted"] is False


def test_converted_directory_agrees_with_the_runtime(converted_bundled):
    hf, conv = model_info(assets.MODEL_DIR), model_info(converted_bundled)
    assert conv["kind"] == "converted" and conv["params"] == hf["params"]
    assert conv["expert_cache_bytes"] == hf["expert_cache_bytes"]  # the HF figures are what convert writes
    assert conv["memory"]["min_budget_bytes"] == hf["memory"]["min_budget_bytes"]
    assert conv["files"]["experts.bin"] == (converted_bundled / "experts.bin").stat().st_size
    least = conv["memory"]["min_budget_bytes"]
    ok = run_cli("generate", converted_bundled, "--memory", least, "-p", "def f", "-n", "2", "--json")
    assert ok.returncode == 0, ok.stderr
    load = json.loads(ok.stdout)["load"]
    assert load["min_budget_bytes"] == least and load["resident_bytes"] == conv["resident_bytes"]
    assert_clean_error(run_cli("generate", converted_bundled, "--memory", least - 1, "-p", "def f", "-n", "2"),
                       "the minimum is", f"(--memory {least})")


def test_budget_and_context_options(converted_bundled):
    info = model_info(converted_bundled, memory="8MB", ctx_size=64)
    w = info["memory"]["with_budget"]
    assert w["budget_bytes"] == 8_000_000 and w["ctx_size"] == 64
    assert 0 < w["cache_bytes"] <= info["expert_cache_bytes"]
    assert info["memory"]["kv_bytes"] == 64 * info["memory"]["kv_bytes_per_token"]


def test_histogram_of_a_mixed_plan(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "default": "bf16", "experts": {"0.0": "int4", "0.1": "int8", "3.2": "int4"}}))
    out = tmp_path / "mixed"
    proc = run_cli("convert", assets.MODEL_DIR, out, "--plan", plan, "-q")
    assert proc.returncode == 0, proc.stderr
    hist = {tuple(b["formats"]): b["experts"] for b in model_info(out)["bits_histogram"]}
    assert hist == {("int4",): 2, ("int8",): 1, ("bf16",): 61}
    bits = [b["bits"] for b in model_info(out)["bits_histogram"]]
    assert bits == sorted(bits) and bits[-1] == 16.0


def test_fitted_predictor_is_reported(tmp_path, converted_bundled):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(converted_bundled, model)
    text = tmp_path / "text.txt"
    text.write_text((assets.MODEL_DIR.parent / "calib.txt").read_text()[:6000])
    assert run_cli("trace", model, "-o", tmp_path / "t.npz", "--text", text).returncode == 0
    proc = run_cli("fit-predictor", model, "--trace", tmp_path / "t.npz")
    assert proc.returncode == 0, proc.stderr
    pred = model_info(model)["predictor"]
    assert pred["fitted"] is True and pred["tokens"] > 0
    (model / "predictor.npz").write_bytes(b"not a zip")
    pred = model_info(model)["predictor"]
    assert pred["fitted"] is False and "cannot read expert predictor" in pred["error"]


def test_cli_text_and_json(converted_bundled):
    proc = run_cli("info", converted_bundled)
    assert proc.returncode == 0, proc.stderr
    for label in ("family", "parameters", "resident", "experts", "bits", "min budget", "context", "predictor"):
        assert any(line.startswith(label) for line in proc.stdout.splitlines()), (label, proc.stdout)
    proc = run_cli("info", converted_bundled, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["memory"]["min_budget_bytes"] > 0


@pytest.mark.parametrize("args,message", [
    (["/nonexistent/model"], "/nonexistent/model: model directory does not exist"),
    ([str(assets.MODEL_DIR), "--memory", "1GB"], "--memory applies to converted models"),
    ([str(assets.MODEL_DIR), "--ctx-size", "100000"], "more than the 256 positions"),
    ([str(assets.MODEL_DIR), "--dtype", "int3"], "unknown dtype"),
])
def test_bad_input(args, message):
    assert_clean_error(run_cli("info", *args), message)


def test_budget_below_the_minimum(converted_bundled):
    assert_clean_error(run_cli("info", converted_bundled, "--memory", "1MB"), "is too small", "the minimum is")
