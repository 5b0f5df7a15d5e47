"""`edgemoe bench` end to end on the bundled model: edgemoe only, no cgroups, and peers
whose environment is missing (reported as unavailable while the rest still runs)."""

import json

import pytest

from edgemoe.cli import main
from edgemoe_lab.peer import report


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--model", "bundled", "--engines", "edgemoe,llama.cpp,transformers",
            "--configs", "IO-FREE,IO-QEXP,EdgeMoE,Belady,llama.cpp,transformers", "--no-cgroup", "--budgets", "100",
            "--repeats", "1", "--tokens", "4", "--out", str(d / "out"), "--work", str(d / "work"),
            "--peers-python", str(d / "no-such-env" / "bin" / "python"), "--quiet"]
    assert main(argv) == 0
    return d, json.loads((d / "out" / "results.json").read_text())


def test_rows_have_the_schema(results):
    _, doc = results
    for row in doc["rows"]:
        assert set(report.ROW_KEYS) <= set(row)
        assert row["engine"] in ("edgemoe", "llama.cpp", "transformers")
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    assert {(r["config"], r["budget"]) for r in ok} >= {("IO-FREE", "unlimited"), ("IO-QEXP", "100%")}
    for r in ok:
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["peak_rss_bytes"] > 0
        assert r["bytes_read"] is not None and r["forced_agreement"] == 1.0  # same weights, same tokens
        if r["engine"] == "edgemoe":  # its own greedy choice at every position (quality of lossy rows)
            assert len(r["greedy_ids"]) == r["generated_tokens"]
    qexp = next(r for r in ok if r["config"] == "IO-QEXP")
    assert 0 <= qexp["hit_rate"] <= 1 and qexp["stall_s"] >= 0 and qexp["memory_arg_bytes"] > 0


def test_missing_peers_are_reported_and_the_rest_still_runs(results):
    d, doc = results
    unavailable = {r["config"]: r["error"] for r in doc["rows"] if r["status"] == "unavailable"}
    assert "no peers environment" in unavailable["llama.cpp"] and "--setup" in unavailable["llama.cpp"]
    assert "no peers environment" in unavailable["transformers"]
    assert "no expert bitwidth plan" in unavailable["EdgeMoE"]
    md = (d / "out" / "results.md").read_text()
    assert "Not available in this installation" in md and "Memory limits were NOT enforced" in md
    assert "--no-cgroup" in md  # the reason, and the exact command
    assert doc["goals"][0]["met"] is None  # no llama.cpp: not evaluated


def test_outputs(results):
    d, doc = results
    assert doc["meta"]["command"].startswith("edgemoe bench --model bundled")
    assert doc["meta"]["machine"]["cpus"] >= 1 and doc["meta"]["disk"]["bytes_per_s"] > 0
    assert doc["lower_bound"]["100%"]["bound_tok_s"] > 0
    assert sorted(p.name for p in (d / "out").glob("*.png")) == ["decode.png", "memory.png"]
    assert not any((d / "work" / "tmp").iterdir())  # run files cleaned up


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["bench", "--budgets", "fifty"]) == 1
    assert "--budgets" in capsys.readouterr().err
    assert main(["bench", "--engines", "vllm"]) == 1
