"""`edgemoe simulate`: hand-computed replays of tiny traces for each policy, CSV parsing
and its errors, the tokens/s estimate, and exact agreement with the real cache's hits and
misses on a recorded trace."""

from __future__ import annotations

import json

import pytest

import edgemoe
from edgemoe.runtime.simulate import Estimate, PhaseCounts, SimulationError, from_trace, load_workload, \
    parse_cache, simulate
from edgemoe.runtime.trace import TraceRecorder

from cli.helpers import assert_clean_error, run_cli
from store.helpers import PROMPTS, make_checkpoint, make_converted, min_budget


def csv_trace(tmp_path, experts, layer=0, extra="") -> str:
    """One decode step per expert id, all in one layer, top-1."""
    lines = ["# a comment line", "step,layer,expert,ignored" + extra]
    lines += [f"{t},{layer},{e},x" for t, e in enumerate(experts)]
    p = tmp_path / "t.csv"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def totals(res) -> tuple[int, int]:
    return sum(c.hits for c in res.phases.values()), sum(c.misses for c in res.phases.values())


# Sequences worked through by hand with a cache of 2 experts:
# A = 0 1 0 2 1 0
#   lru:    m m h m(evict 1) m(evict 0) m(evict 2)            -> 1 hit, 5 misses
#   lfu:    m m h m(evict 1: f=1 < f0=2) m(evict 2) h         -> 2 hits, 4 misses
#   belady: m m h m(evict 0: next use t5 > 1's t4) h m        -> 2 hits, 4 misses
# B = 0 0 1 2 1 2 1 2
#   lru:    m h m m(evict 0) h h h h                          -> 5 hits, 3 misses
#   lfu:    m h m m(evict 1) m(evict 2) m(evict 0: tie, older) h h -> 3 hits, 5 misses
#   belady: m h m m(evict 0: never used again) h h h h        -> 5 hits, 3 misses
@pytest.mark.parametrize("seq,want", [
    ([0, 1, 0, 2, 1, 0], {"lru": (1, 5), "lfu": (2, 4), "belady": (2, 4)}),
    ([0, 0, 1, 2, 1, 2, 1, 2], {"lru": (5, 3), "lfu": (3, 5), "belady": (5, 3)}),
])
def test_policies_by_hand(tmp_path, seq, want):
    work = load_workload(csv_trace(tmp_path, seq), top_k=1, num_experts=3)
    assert work.top_k == 1 and work.num_experts == 3 and work.moe_layers == [0]
    for policy, (hits, misses) in want.items():
        res = simulate(work, policy, 2)
        assert totals(res) == (hits, misses), policy
        assert res.phases["decode"].tokens == len(seq) and res.phases["prefill"].tokens == 0


def test_phases_are_counted_apart(tmp_path):
    p = tmp_path / "p.csv"
    # step 0 is prefill (marked), steps 1-2 decode; two layers, top-2.
    p.write_text("step,layer,expert,phase,weight\n"
                 "0,0,0,0,0.5\n0,0,1,0,0.5\n0,0,2,0,0.1\n0,1,3,0,0.9\n0,1,0,0,0.1\n"
                 "1,0,0,1,0.5\n1,0,1,1,0.5\n1,1,3,1,0.5\n1,1,0,1,0.5\n"
                 "2,0,2,1,0.5\n2,0,1,1,0.5\n2,1,3,1,0.5\n2,1,1,1,0.5\n")
    work = load_workload(p)
    assert (work.top_k, work.num_experts, work.moe_layers) == (2, 4, [0, 1])
    assert [f.phase for f in work.forwards] == ["prefill", "decode", "decode"]
    res = simulate(work, "lru", 8)  # holds everything: only first uses miss
    assert (res.phases["prefill"].hits, res.phases["prefill"].misses) == (0, 5)
    # decode step 1: all 4 cached; step 2: (0,2),(0,1),(1,3) cached, (1,1) new.
    assert (res.phases["decode"].hits, res.phases["decode"].misses) == (7, 1)


def test_prefill_inferred_without_phase_column(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text("layer,step,expert\n0,0,0\n0,0,1\n0,0,2\n0,1,1\n0,2,2\n")
    work = load_workload(p, top_k=1)
    assert [f.phase for f in work.forwards] == ["prefill", "decode", "decode"]


@pytest.mark.parametrize("text,needle", [
    ("step,layer\n0,0\n", "lacks the column(s) expert"),
    ("step,layer,expert\n0,0,x\n", "column 'expert' must be an integer"),
    ("step,layer,expert\n0,-1,2\n", "column 'layer' must be >= 0"),
    ("step,layer,expert,phase\n0,0,1,3\n", "phase must be 0 (prefill) or 1 (decode)"),
    ("# only a comment\n", "empty trace"),
    ("step,layer,expert\n", "no rows"),
])
def test_csv_errors_name_the_problem(tmp_path, text, needle):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(SimulationError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_workload(p)


def test_cache_sizes():
    assert parse_cache("25%", 64, None) == 16
    assert parse_cache("0.5", 64, None) == 32
    assert parse_cache("10", 64, None) == 10
    assert parse_cache("1000", 64, None) == 64
    assert parse_cache("3MB", 64, 1_000_000) == 3
    for bad, needle in (("3MB", "give --expert-bytes"), ("0%", r"in \(0, 1\]"), ("0", "at least 1"),
                        ("1KB", "no whole expert")):
        with pytest.raises(SimulationError, match=needle):
            parse_cache(bad, 64, 1_000_000 if bad == "1KB" else None)


def test_estimate_by_hand():
    # 10 decode tokens with 20 misses of 1 MB at 100 MB/s: 2 misses/token -> 20 ms stall per
    # token; 4 layers x 5 ms compute = 20 ms; 40 ms per token -> 25 tok/s.
    e = Estimate(expert_bytes=1_000_000, bandwidth=100e6, compute_ms_per_layer=5.0, layers=4)
    got = e.decode(PhaseCounts(hits=0, misses=20, tokens=10))
    assert got == {"stall_ms_per_token": 20.0, "compute_ms_per_token": 20.0, "tokens_per_s": 25.0}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("sim")
    hf = make_checkpoint(d / "hf", "olmoe", tokenizer_dir)
    conv = make_converted(hf, d / "conv")
    return conv, min_budget(conv)


@pytest.mark.parametrize("policy", ["lru", "lfu", "edgemoe"])
def test_replay_matches_the_real_cache(recorded, policy):
    """With preloading and read-ahead off and equal expert sizes, the replay's hits and
    misses are the runtime's own, at the smallest budget and with room for three more
    experts."""
    conv, low = recorded
    for extra in (0, 3):
        engine = edgemoe.load(conv, memory=low + extra * 36864, prefetch=False, read_ahead=False,
                              cache_policy=policy)
        try:
            rec = TraceRecorder(engine.model)
            hits = misses = 0
            for p in PROMPTS:
                r = engine.generate(p, max_tokens=8, ignore_eos=True)
                hits, misses = hits + r.stats.extra["hits"], misses + r.stats.extra["misses"]
            provider = next(engine.model.moe_blocks()).provider
            lengths = {provider.cache.blob_bytes((layer, e)) for layer in provider.layers
                       for e in range(provider.num_experts)}
            assert len(lengths) == 1
            capacity = engine.info["cache_bytes"] // lengths.pop()
            trace = rec.trace()
        finally:
            engine.close()
        assert totals(simulate(from_trace(trace), policy, capacity)) == (hits, misses), (policy, extra)


def test_cli_end_to_end(tmp_path, recorded):
    conv, _ = recorded
    trace = tmp_path / "t.npz"
    proc = run_cli("generate", str(conv), "-p", "def add(a, b):", "-n", "12", "--ignore-eos",
                   "--record-trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    plot = tmp_path / "hit.png"
    proc = run_cli("simulate", str(trace), "--cache", "25%", "--cache", "4", "--expert-bytes", "36864",
                   "--bandwidth", "90MB/s", "--compute-ms-per-layer", "0.2", "--plot", str(plot), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert plot.stat().st_size > 1000
    assert {r["policy"] for r in out["results"]} == {"lru", "lfu", "edgemoe", "belady"}
    for r in out["results"]:
        assert r["decode"]["tokens"] == 11 and 0 <= r["decode"]["hit_rate"] <= 1
        assert r["estimate"]["tokens_per_s"] > 0
    by = {(r["cache_experts"], r["policy"]): r["decode"]["hit_rate"] for r in out["results"]}
    for n in (4, out["results"][0]["cache_experts"]):  # Belady is the optimum
        assert by[(n, "belady")] >= max(by[(n, p)] for p in ("lru", "lfu", "edgemoe"))
    proc = run_cli("simulate", str(trace))
    assert proc.returncode == 0 and "belady" in proc.stdout and "predictors" in proc.stdout


@pytest.mark.parametrize("args,needles", [
    (["--policy", "fifo"], ["--policy", "fifo"]),
    (["--bandwidth", "90MB/s"], ["--bandwidth, --compute-ms-per-layer and --expert-bytes"]),
    (["--cache", "2GB"], ["--expert-bytes"]),
    (["--fit-fraction", "1.5"], ["--fit-fraction"]),
])
def test_cli_errors(tmp_path, args, needles):
    p = csv_trace(tmp_path, [0, 1, 0, 2])
    assert_clean_error(run_cli("simulate", p, *args), *needles)


def test_cli_missing_file(tmp_path):
    assert_clean_error(run_cli("simulate", str(tmp_path / "none.csv")), "none.csv", "no such trace file")
