"""`--adaptive-gating MASS` end to end: in RAM and offloaded give the same tokens, and the
offloaded run reads fewer expert bytes than plain top-k."""

import json

import pytest

from edgemoe import assets

from .helpers import assert_clean_error, run_cli

PROMPT = "def fibonacci(n):"


def generate(*args) -> dict:
    proc = run_cli("generate", *args, "--prompt", PROMPT, "--max-tokens", 12, "--temperature", 0, "--json",
                   "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("adaptive") / "conv"
    proc = run_cli("convert", assets.MODEL_DIR, out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def test_same_tokens_in_ram_and_offloaded_and_fewer_bytes(converted):
    in_ram = generate(assets.MODEL_DIR, "--adaptive-gating", "0.6")
    plain = generate(converted, "--memory", "4.4MB", "--no-prefetch")
    adaptive = generate(converted, "--memory", "4.4MB", "--no-prefetch", "--adaptive-gating", "0.6")
    assert adaptive["token_ids"] == in_ram["token_ids"]
    assert adaptive["load"]["adaptive_gating"] == 0.6
    # Confident tokens keep one expert: fewer experts are requested, so fewer bytes are read.
    requests = lambda r: r["stats"]["hits"] + r["stats"]["misses"]  # noqa: E731
    assert requests(adaptive) < requests(plain)
    assert adaptive["stats"]["bytes_read"] < plain["stats"]["bytes_read"]


def test_bad_mass_is_a_clean_error():
    proc = run_cli("generate", "--prompt", "x", "--max-tokens", 1, "--adaptive-gating", "1.5")
    assert_clean_error(proc, "adaptive gating")
