"""`edgemoe bench --model FILE.gguf`: the peer comparison starting from a GGUF file.
llama.cpp is not installed in the tests, so its run is intercepted where the runner would
start it: what matters here is the plumbing (llama.cpp gets the file itself, edgemoe a
conversion of it, transformers is skipped with the reason) and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_checkpoint, tiny_config

from edgemoe_lab.peer import peers, runner
from edgemoe.cli import main
from edgemoe.store.manifest import read_manifest

from store.gguf_helpers import write_gguf


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("bench-gguf")
    hf = save_checkpoint(tiny_config("qwen3_moe", hidden_size=64, moe_intermediate_size=64), d / "hf",
                         tokenizer_dir, dtype=torch.float16).float()
    (path,), _ = write_gguf(hf, tokenizer_dir, d / "tiny-Q8_0.gguf", "Q8_0")
    return path


def bench_argv(gguf, d, *extra) -> list[str]:
    return ["bench", "--model", str(gguf), "--configs", "IO-FREE,IO-QEXP,llama.cpp,transformers", "--no-cgroup",
            "--budgets", "400", "--repeats", "1", "--tokens", "4", "--out", str(d / "out"), "--work", str(d / "work"),
            "--peers-python", str(d / "no-such-env" / "bin" / "python"), "--limit-adds-overhead", "--quiet", *extra]


@pytest.fixture(scope="module")
def results(gguf_file, tmp_path_factory):
    """A run whose llama.cpp is 'installed' (check_llama answers) but whose llama.cpp runs
    are intercepted: the spec each would have received is recorded."""
    d = tmp_path_factory.mktemp("bench-run")
    mp = pytest.MonkeyPatch()
    seen = []
    real_run = runner.run

    def run(launch, **kw):
        if any(a.endswith("llama_run.py") for a in launch.argv):
            seen.append(launch.spec)
            return {"status": "error", "error": "llama.cpp is not run in the tests"}
        return real_run(launch, **kw)

    mp.setattr(peers, "check_llama", lambda python: {"version": "test", "converter": "/no/convert_hf_to_gguf.py",
                                                      "quantize": "/no/llama-quantize"})
    mp.setattr(runner, "run", run)
    try:
        assert main(bench_argv(gguf_file, d)) == 0
    finally:
        mp.undo()
    return d, json.loads((d / "out" / "results.json").read_text()), seen


def test_llama_cpp_gets_the_file_and_edgemoe_its_conversion(results, gguf_file):
    d, doc, seen = results
    meta = doc["meta"]
    assert seen and all(spec["gguf"] == str(gguf_file) for spec in seen)  # the file itself, not a re-conversion
    assert not list((d / "work").glob("gguf-*"))  # llama.cpp's converter and quantizer never ran
    assert meta["peers"]["llama.cpp"]["gguf"] == str(gguf_file)
    assert meta["peers"]["llama.cpp"]["gguf_type"] == "Q8_0"
    assert meta["size_bytes"] == gguf_file.stat().st_size and "GGUF file given" in meta["size_of"]
    assert "GGUF qwen3moe" in meta["model"]
    store = meta["edgemoe_store"]
    assert store["expert_format"] == ["int8"]  # the conversion's default plan keeps Q8_0's precision
    m = read_manifest(store["path"])
    assert m.config["gguf"]["file"] == gguf_file.name and m.resident_int8  # --resident int8, as for a directory


def test_edgemoe_runs_and_transformers_is_skipped_with_the_reason(results):
    _, doc, _ = results
    ok = {(r["config"], r["budget"]) for r in doc["rows"] if r["status"] == "ok"}
    assert {("IO-FREE", "unlimited"), ("IO-QEXP", "400%")} <= ok
    unavailable = {r["config"]: r["error"] for r in doc["rows"] if r["status"] == "unavailable"}
    assert "GGUF file" in unavailable["transformers"] and "Hugging Face directory" in unavailable["transformers"]
    errors = {r["config"]: r["error"] for r in doc["rows"] if r["status"] == "error"}
    assert errors["llama.cpp"] == "llama.cpp is not run in the tests"


def test_bits_requantizes_the_gguf(gguf_file, tmp_path):
    argv = bench_argv(gguf_file, tmp_path, "--bits", "4")
    argv[argv.index("--configs") + 1] = "IO-FREE,llama.cpp"
    assert main(argv) == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["meta"]["edgemoe_store"]["expert_format"] == ["int4"]
    assert "llama.cpp" in doc["meta"]["unavailable"]  # no peers' environment here: reported, not fatal


def test_gguf_errors_are_one_line(gguf_file, tmp_path, capsys):
    missing = tmp_path / "nope.gguf"
    assert main(bench_argv(missing, tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "does not exist" in err
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf" * 20)
    assert main(bench_argv(junk, tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(junk) in err and "not a GGUF file" in err
    argv = bench_argv(gguf_file, tmp_path, "--engines", "transformers")
    argv[argv.index("--configs") + 1] = "transformers"
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "transformers runs a Hugging Face directory" in err
    assert main(bench_argv(tmp_path, tmp_path)) == 1
    assert "nor a GGUF file" in capsys.readouterr().err
