"""The bench's configurations as data, the store kinds they need, and how the lossy ones
are reported (issue 16's knobs: cache-aware routing, low-bit copies on a miss)."""

import pytest

from edgemoe.runtime.config import RuntimeConfig
from edgemoe_lab.peer import configs as C
from edgemoe_lab.peer import model, report, write


def by_name(name):
    return next(c for c in C.CONFIGS if c.name == name)


def test_configs_are_unique_and_name_a_known_store():
    names = [c.name for c in C.CONFIGS]
    assert len(names) == len(set(names))
    for c in C.CONFIGS:
        assert c.engine in C.ENGINES
        if c.engine == C.EDGEMOE:
            assert c.store in C.STORE_KINDS, c.name
        else:
            assert c.store is None and not c.runtime and not c.lossy


def test_every_edgemoe_runtime_is_a_valid_load_config():
    for c in C.CONFIGS:
        if c.engine == C.EDGEMOE:
            rt = C.edgemoe_runtime(c)
            if c.runtime.get("cache_policy") == "belady":
                continue  # needs the reference run's trace
            RuntimeConfig.from_options(memory=1 << 30, **rt)  # raises on an unknown or bad option


def test_prefetch_reaches_the_runtime():
    # The runtime's options live in RuntimeConfig: EdgeMoE must run with prefetch on, not be
    # reported as lacking it.
    assert C.runtime_supports("prefetch") and C.runtime_supports("fallback_below")
    assert not C.runtime_supports("no_such_option")
    assert C.edgemoe_runtime(by_name("EdgeMoE"))["prefetch"] is True
    assert C.unavailable_reason(by_name("EdgeMoE"), "plan.json") is None


def test_knob_rows_are_edgemoe_plus_their_knob_and_lossy():
    base = by_name("EdgeMoE")
    assert not base.lossy and base.store == "plan"
    routing, fallback, both = by_name("EdgeMoE+cache-routing"), by_name("EdgeMoE+fallback"), by_name("EdgeMoE+all")
    assert routing.runtime == {**base.runtime, "cache_aware_routing": C.ROUTING_MARGIN} and routing.store == "plan"
    assert fallback.runtime == {**base.runtime, "fallback_below": C.FALLBACK_BELOW}
    assert fallback.store == both.store == "plan-fallback"
    assert both.runtime == {**base.runtime, "cache_aware_routing": C.ROUTING_MARGIN, "fallback_below": C.FALLBACK_BELOW}
    for c in (routing, fallback, both):
        assert c.lossy and c.base == "EdgeMoE" and c.prefetch is base.prefetch and not c.unlimited
    assert {c.name for c in C.CONFIGS if c.lossy} == {routing.name, fallback.name, both.name}
    why = C.unavailable_reason(fallback, None)
    assert why and "no expert bitwidth plan" in why  # the fallback store is converted from the plan
    assert [c.name for c in C.select(["EdgeMoE+all", "EdgeMoE"])] == ["EdgeMoE", "EdgeMoE+all"]


def test_plan_store_kinds_convert_with_their_flags(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(model, "ensure_store", lambda work, hf, name, flags, log: calls.append((name, flags)) or
                        work / name)
    plan = tmp_path / "plan.json"
    hf = tmp_path / "hf-x"
    res = ["--resident", "int8"]
    assert model.plan_store(tmp_path, hf, "plan", plan, res, print) == tmp_path / "edgemoe-plan-hf-x"
    assert model.plan_store(tmp_path, hf, "plan-fallback", plan, res, print) == tmp_path / "edgemoe-plan-fb2-hf-x"
    assert calls == [("edgemoe-plan-hf-x", ["--plan", str(plan.resolve()), *res]),
                     ("edgemoe-plan-fb2-hf-x", ["--plan", str(plan.resolve()), "--fallback-bits",
                                                str(C.FALLBACK_BITS), *res])]
    with pytest.raises(ValueError, match="quant"):
        model.plan_store(tmp_path, hf, "quant", plan, res, print)


def _rows():
    def run(config, engine, decode, agree, rep, greedy):
        out = {"status": "ok", "decode_tok_s": decode, "prefill_tok_s": 10.0, "generated_tokens": 4,
               "forced_agreement": agree, "greedy_ids": greedy}
        return report.make_row(engine, config, 0.5, 1000, rep, out)

    return [run("EdgeMoE", "edgemoe", 4.0, 0.5, r, [1, 2, 3, 4]) for r in (1, 2)] + \
        [run("EdgeMoE+all", "edgemoe", 8.0, 0.25, 1, [1, 2, 3, 9]),  # 3 of 4 choices as EdgeMoE's
         run("EdgeMoE+all", "edgemoe", 8.0, 0.25, 2, [1, 2, 8, 9])] + \
        [run("llama.cpp", "llama.cpp", 1.0, 0.5, r, None) for r in (1, 2)]


def test_the_goal_names_a_lossy_winner_with_its_agreement():
    rows = _rows()
    write.base_agreements(rows)
    assert [r["base_agreement"] for r in rows] == [None, None, 0.75, 0.5, None, None]
    summary = report.aggregate(rows)
    assert summary[("edgemoe", "EdgeMoE+all", "50%")]["base_agreement"]["median"] == pytest.approx(0.625)
    g = next(g for g in write.goals(rows, summary, ["50%"]) if g["budget"] == "50%")
    assert g["best_config"] == "EdgeMoE+all" and g["ratio"] == 8.0 and g["met"] is True
    assert "lossy: greedy agreement with EdgeMoE 62.5% (50.0%–75.0%)" in g["verdict"]
    assert write.quality(summary[("edgemoe", "EdgeMoE", "50%")]) == "0.500"  # forced agreement
    assert write.quality(None) == "-"


def test_results_md_marks_lossy_rows_and_shows_agreement(tmp_path):
    meta = {"command": "edgemoe bench", "date": "today", "duration_s": 60, "threads": 2, "repeats": 2,
            "timeout_s": 240.0, "loadavg_start": [0.1], "loadavg_end": [0.1], "model": "m", "size_bytes": 1 << 30,
            "size_of": "the GGUF file", "page_cache_drop": False, "cgroup": {"available": False, "reason": "test"},
            "machine": {"cpu": "cpu", "cpus": 2, "simd": [], "memory_bytes": 1 << 34, "platform": "linux"},
            "edgemoe_store": {"bytes": 1 << 30, "resident_bytes": 1 << 20, "expert_bytes": 1 << 29,
                              "expert_format": ["int4"]},
            "token_stream": {"prompt_tokens": 8, "generated_tokens": 4},
            "edgemoe_overhead": {"bytes": 1 << 28, "baseline_rss_bytes": 1 << 28, "margin_bytes": 1 << 25}}
    bw = {"bytes_per_s": 1e9, "mode": "direct", "chunk_bytes": 1 << 22}
    write.write_results(tmp_path, meta, _rows(), ["50%"], [0.5], meta["size_bytes"], bw, log=lambda m: None)
    md = (tmp_path / "results.md").read_text()
    assert "| EdgeMoE+all | **lossy** | EdgeMoE | 8.00x | 0.625 (0.500–0.750) |" in md
    assert "| EdgeMoE | no | the token stream | 4.00x | 0.500 |" in md
    assert "| 50% | edgemoe | EdgeMoE+all (lossy) | ok x2 | 8.00 | 0.250 | 0.625 (0.500–0.750) |" in md
