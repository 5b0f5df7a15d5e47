"""The offloaded runtime from the command line: flags, statistics, traces, errors."""

from __future__ import annotations

import json

import pytest

from edgemoe.utils import parse_size

from cli.helpers import run_cli
from store.helpers import make_checkpoint, make_converted

PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("cli")
    hf = make_checkpoint(d / "hf", "olmoe", tokenizer_dir)
    return hf, make_converted(hf, d / "conv"), d


def generate_json(*args) -> dict:
    proc = run_cli("generate", *args, "-p", PROMPT, "-n", "8", "--ignore-eos", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_json_stats_and_same_tokens_as_in_ram(model):
    hf, conv, d = model
    ref = generate_json(hf, "--record-trace", d / "trace.npz")
    assert (d / "trace.npz").exists()
    # 2 MB: the resident weights, KV cache and workspace (1.8 MB) plus room for ~3 layers' experts.
    out = generate_json(conv, "--memory", "2MB", "--cache-policy", "edgemoe")
    assert out["token_ids"] == ref["token_ids"]
    s = out["stats"]
    for key in ("hits", "misses", "hit_rate", "bytes_read", "bytes_read_per_token", "read_s", "stall_s",
                "peak_rss_bytes", "budget_bytes", "budget_used_bytes", "resident_bytes", "cache_bytes",
                "baseline_rss_bytes", "rss_over_baseline_bytes", "io", "mode", "cache_policy"):
        assert key in s, key
    assert s["budget_bytes"] == 2_000_000 and s["budget_used_bytes"] <= 2_000_000
    assert s["cache_policy"] == "edgemoe" and s["mode"] == "io-exp" and s["misses"] > 0
    assert out["load"]["kind"] == "converted" and out["load"]["min_budget_bytes"] <= 2_000_000
    belady = generate_json(conv, "--memory", "2MB", "--cache-policy", "belady", "--trace", d / "trace.npz")
    assert belady["token_ids"] == ref["token_ids"]
    assert belady["stats"]["misses"] <= s["misses"]
    free = generate_json(conv, "--mode", "io-free")
    assert free["token_ids"] == ref["token_ids"] and free["stats"]["bytes_read"] == 0


def test_human_summary(model):
    _, conv, _ = model
    proc = run_cli("generate", conv, "--memory", "2MB", "-p", PROMPT, "-n", "4", "--no-direct-io")
    assert proc.returncode == 0, proc.stderr
    assert "hit rate" in proc.stderr and "buffered I/O" in proc.stderr and "budget 2.0 MB" in proc.stderr
    assert "over a baseline of" in proc.stderr


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--memory", "100KB"], ["too small", "the minimum is", "--memory "]),
        (["--memory", "lots"], ["cannot parse size"]),
        (["--cache-policy", "belady"], ["needs a routing trace"]),
        (["--mode", "io-free", "--memory", "1MB"], ["io-free keeps every expert in RAM"]),
        (["hf", "--cache-policy", "lfu"], ["need a converted model"]),
    ],
    ids=["budget", "size", "trace", "io-free", "hf-dir"],
)
def test_errors(model, capsys, args, needles):
    """In-process (fast); the subprocess form of these messages is tested with the corruption cases."""
    from edgemoe.cli import main

    hf, conv, _ = model
    path = hf if args[0] == "hf" else conv
    args = [a for a in args if a != "hf"]
    assert main(["generate", str(path), *args, "-p", "x", "-n", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgemoe: error:"), err
    for n in needles:
        assert n in err[0], err[0]


def test_sizes():
    assert parse_size("800MB") == 800_000_000
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("123456") == 123456
    assert parse_size(4096) == 4096
