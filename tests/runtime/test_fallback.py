"""`--fallback-below W`: a miss of an expert whose share of each token's routing weight is
below W is served from its small copy (convert --fallback-bits); without the knob (or at
0) tokens and statistics are the lossless runtime's; the budget counts the small copies'
cache and the options are checked by name."""

from __future__ import annotations

import json

import pytest
import torch

import edgemoe
from edgemoe.errors import BudgetError, InvalidArgument, ModelLoadError, StoreError
from edgemoe.quant.formats import get_format
from edgemoe.store.convert import convert
from edgemoe.store.manifest import read_manifest

from cli.helpers import assert_clean_error, run_cli
from store.helpers import PROMPTS, make_checkpoint, run_prompts

COUNTS = ("hits", "misses", "bytes_read", "evictions")


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("fallback")
    hf = make_checkpoint(d / "hf", "mixtral", tokenizer_dir)  # 3 layers x 4 experts, top-2
    conv = d / "conv"
    convert(hf, conv, fallback_bits=2)
    plain = d / "plain"
    convert(hf, plain)
    e = edgemoe.load(conv)
    info = e.info
    e.close()
    return hf, conv, plain, info


def smallest(conv) -> int:
    """The small copies' least cache: the largest small blob."""
    return max(e.length for e in read_manifest(conv).fallback.experts)


def run(path, **kw):
    engine = edgemoe.load(path, threads=1, **kw)
    try:
        tokens = run_prompts(engine)
        stats = engine.provider.stats() if engine.provider is not None else None
        return tokens, (stats.to_dict() if hasattr(stats, "to_dict") else stats)
    finally:
        engine.close()


def test_lossless_without_the_knob_or_at_zero(model):
    hf, conv, plain, info = model
    want, _ = run(hf)
    small = info["min_budget_bytes"]
    tokens, base = run(plain, memory=small, prefetch=False)
    assert tokens == want
    tokens, s = run(conv, memory=small, prefetch=False)  # the small copies are there, unused
    assert tokens == want and {k: s[k] for k in COUNTS} == {k: base[k] for k in COUNTS}
    assert "fallback_reads" not in s
    # Never: the same cache for full copies (the budget grows by the small copies' cache).
    tokens, s = run(conv, memory=small + smallest(conv), prefetch=False, fallback_below=0.0)
    assert tokens == want and {k: s[k] for k in COUNTS} == {k: base[k] for k in COUNTS}
    assert s["fallback_reads"] == s["fallback_hits"] == s["fallback_bytes_read"] == 0


def test_a_low_weight_miss_reads_the_small_copy(model):
    """One layer request by hand: weights 0.8 / 0.2 for experts 1 / 3 with W = 0.25: expert
    3 comes from its int2 copy, expert 1 from its full copy; asked again, both are hits."""
    _, conv, _, _ = model
    m = read_manifest(conv)
    engine = edgemoe.load(conv, prefetch=False, fallback_below=0.25)
    try:
        p = engine.provider
        p.reset_stats()
        p.begin_forward(1)
        x = torch.randn(1, engine.model.args.hidden_size)
        rows = torch.tensor([[1, 3]])
        got = {}
        for _ in range(2):
            p.note_weights(0, torch.tensor([[0.8, 0.2]]))
            got = {e: ex(x) for e, ex in p.experts(0, [1, 3], x, rows)}
        s = p.stats().to_dict()
        full, small = m.table()[(0, 1)], m.fallback.table()[(0, 3)]
        assert s["fallback_reads"] == 1 and s["fallback_hits"] == 1  # read once, then held in its cache
        assert s["misses"] == 1 and s["hits"] == 1  # expert 1: read in full once, then a hit
        assert s["fallback_bytes_read"] == small.length
        assert s["fallback_bytes_saved"] == m.table()[(0, 3)].length - small.length
        assert s["bytes_read"] == full.length + small.length  # every byte read from storage
        # Expert 3's output is its int2 copy's: the same codes, encoded from its weights.
        from edgemoe.store.reader import ExpertStore

        store = ExpertStore(conv, fallback=True)
        try:
            buf = memoryview(bytearray(small.length))
            store.read_into(small, buf)
            blob = torch.frombuffer(buf, dtype=torch.uint8)
            want = store.expert(small, blob, engine.model.args.expert_act, torch.float32)(x)
        finally:
            store.close()
        torch.testing.assert_close(got[3], want, rtol=0, atol=0)
        assert get_format("int2").name == small.format
    finally:
        engine.close()


def test_fallback_changes_reads_not_correctness(model):
    """W = 1: every miss is served small; the main cache reads nothing in decode... and the
    output stays close to the lossless one (int2 copies of a random model)."""
    _, conv, _, info = model
    small = info["min_budget_bytes"]
    want, base = run(conv, memory=small, prefetch=False)
    tokens, s = run(conv, memory=small + smallest(conv), prefetch=False, fallback_below=1.0)
    assert s["fallback_reads"] > 0 and s["fallback_bytes_saved"] > 0
    assert s["bytes_read"] < base["bytes_read"]
    assert len(tokens) == len(want)


def test_budget_counts_the_small_copies(model):
    _, conv, _, info = model
    m = read_manifest(conv)
    blob = max(e.length for e in m.fallback.experts)
    e = edgemoe.load(conv, fallback_below=0.5)
    least = e.info["min_budget_bytes"]
    e.close()
    assert least == info["min_budget_bytes"] + blob
    with pytest.raises(BudgetError, match=f"--memory {least}"):
        edgemoe.load(conv, memory=least - 1, fallback_below=0.5)
    e = edgemoe.load(conv, memory=least, fallback_below=0.5, prefetch=False)
    try:
        assert e.info["fallback_cache_bytes"] == blob
        assert e.info["cache_bytes"] + blob <= least - (info["min_budget_bytes"] - info["min_cache_bytes"])
        run_prompts(e)
        assert e.provider.stats().to_dict()["budget_used_bytes"] <= least
    finally:
        e.close()


def test_options_checked_by_name(model, tmp_path):
    hf, conv, plain, _ = model
    for bad in (-0.1, 1.5, True, "x"):
        with pytest.raises(InvalidArgument, match="--fallback-below"):
            edgemoe.load(conv, fallback_below=bad)
    with pytest.raises(StoreError, match="no fallback copies.*--fallback-bits"):
        edgemoe.load(plain, fallback_below=0.5)
    with pytest.raises(InvalidArgument, match="io-free"):
        edgemoe.load(conv, mode="io-free", fallback_below=0.5)
    with pytest.raises(ModelLoadError, match="converted model"):
        edgemoe.load(hf, fallback_below=0.5)
    r = run_cli("generate", conv, "-p", "hi", "-n", "2", "--fallback-below", "2")
    assert_clean_error(r, "--fallback-below")
    r = run_cli("generate", plain, "-p", "hi", "-n", "2", "--fallback-below", "0.5")
    assert_clean_error(r, "no fallback copies", "--fallback-bits")


def test_cli_reports_the_small_copies(model):
    _, conv, _, info = model
    least = info["min_budget_bytes"] + smallest(conv)
    r = run_cli("generate", conv, "-p", "hi", "-n", "3", "--ignore-eos", "--fallback-below", "1", "--memory",
                str(least), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["stats"]
    assert s["fallback_below"] == 1.0 and s["fallback_reads"] > 0 and s["fallback_cache_bytes"] == smallest(conv)
    r = run_cli("generate", conv, "-p", "hi", "-n", "3", "--ignore-eos", "--fallback-below", "1", "--memory",
                str(least))
    assert r.returncode == 0, r.stderr
    assert "small copies on a miss: below 1 |" in r.stderr


def test_shared_experts_use_their_shared_small_copy(tmp_path, tokenizer_dir):
    from edgemoe.checkpoint import HFCheckpoint
    from edgemoe.compress.rewrite import rewrite

    hf = make_checkpoint(tmp_path / "hf", "mixtral", tokenizer_dir)
    canon = dict(HFCheckpoint(hf).tensors())
    src = {p: canon[f"experts.0.0.{p}"] for p in ("gate", "up", "down")}
    rewrite(hf, tmp_path / "dup", replace={(0, 1): src, (0, 2): src, (0, 3): src})  # layer 0: one blob
    conv = tmp_path / "conv"
    convert(tmp_path / "dup", conv, fallback_bits=2)
    engine = edgemoe.load(conv, prefetch=False, fallback_below=1.0)
    try:
        p = engine.provider
        p.reset_stats()
        p.begin_forward(1)
        x = torch.randn(1, engine.model.args.hidden_size)
        p.note_weights(0, torch.tensor([[0.6, 0.4]]))
        got = [e for e, _ in p.experts(0, [2, 3], x, torch.tensor([[2, 3]]))]
        s = p.stats()
        assert sorted(got) == [2, 3] and s["fallback_reads"] == 1 and s["fallback_uses"] == 1  # one blob, read once
    finally:
        engine.close()


def test_a_damaged_small_copy_is_caught_by_its_checksum(model, tmp_path):
    import shutil

    _, conv, _, info = model
    bad = tmp_path / "bad"
    shutil.copytree(conv, bad)
    e = read_manifest(bad).fallback.table()[(0, 0)]
    with open(bad / "experts.fallback.bin", "r+b") as f:
        f.seek(e.offset + 10)
        byte = f.read(1)
        f.seek(e.offset + 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    engine = edgemoe.load(bad, prefetch=False, fallback_below=1.0, verify="always")
    try:
        p = engine.provider
        p.begin_forward(1)
        x = torch.randn(1, engine.model.args.hidden_size)
        p.note_weights(0, torch.tensor([[0.5, 0.5]]))
        with pytest.raises(StoreError, match="experts.fallback.bin: layer 0 expert 0: checksum mismatch"):
            list(p.experts(0, [0, 1], x, torch.tensor([[0, 1]])))
    finally:
        engine.close()


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "eval"])
def test_every_model_command_takes_the_knob(command):
    import importlib

    from edgemoe.cli.common import runtime_config
    from edgemoe.runtime.config import RuntimeConfig

    module = importlib.import_module(f"edgemoe.cli.{command}")
    args = module.build_parser().parse_args(["model", "--fallback-below", "0.3"])
    assert runtime_config(args) == RuntimeConfig(fallback_below=0.3)


def test_no_small_copy_where_it_saves_nothing(model, tmp_path):
    """Experts already stored at 2 bits: their int2 copy is no smaller, so it is never read."""
    hf = model[0]
    conv = tmp_path / "int2"
    convert(hf, conv, fmt="int2", fallback_bits=2)
    with edgemoe.load(conv) as e:
        least = e.info["min_budget_bytes"]
    want, base = run(conv, memory=least, prefetch=False)
    tokens, s = run(conv, memory=least + smallest(conv), prefetch=False, fallback_below=1.0)
    assert tokens == want and s["fallback_uses"] == 0 and s["misses"] == base["misses"] > 0
