"""Result rows, aggregation over repeats, ratios and table cells."""

from edgemoe_lab.peer import report


def run(decode, status="ok", **kw):
    out = {"status": status, "decode_tok_s": decode, "prefill_tok_s": 10.0, "prompt_tokens": 8,
           "generated_tokens": 4, "proc_io": {"read_bytes": 1000}, "proc_status": {"VmHWM": 5000},
           "cgroup_peak_bytes": 6000, "engine_stats": {"hit_rate": 0.5, "stall_s": 0.25}}
    out.update(kw)
    return out


def test_row_has_the_schema():
    row = report.make_row("edgemoe", "IO-QEXP", 0.5, 1000, 1, run(2.0), memory_arg=700)
    assert set(report.ROW_KEYS) <= set(row)
    assert row["engine"] == "edgemoe" and row["config"] == "IO-QEXP" and row["budget"] == "50%"
    assert row["budget_fraction"] == 0.5 and row["decode_tok_s"] == 2.0 and row["prefill_tok_s"] == 10.0
    assert row["peak_rss_bytes"] == 5000 and row["bytes_read"] == 1000 and row["cgroup_peak_bytes"] == 6000
    assert row["hit_rate"] == 0.5 and row["stall_s"] == 0.25 and row["memory_arg_bytes"] == 700
    peer = report.make_row("llama.cpp", "llama.cpp", None, None, 1, run(1.0, engine_stats={}))
    assert peer["budget"] == "unlimited" and peer["hit_rate"] is None


def test_timeout_keeps_the_rate_so_far():
    out = {"status": "timeout", "error": "stopped", "progress": {"phase": "decode", "tokens": 5, "decode_s": 8.0},
           "log_tail": "x" * 5000}
    row = report.make_row("llama.cpp", "llama.cpp", 0.25, 10, 1, out)
    assert row["status"] == "timeout" and row["tokens_done"] == 5 and row["partial_decode_tok_s"] == 0.5
    assert row["decode_tok_s"] is None and len(row["log_tail"]) == 800


def test_aggregate_medians_min_max_over_finished_runs():
    rows = [report.make_row("edgemoe", "IO-QEXP", 0.5, 10, i + 1, run(v)) for i, v in enumerate((3.0, 1.0, 2.0))]
    rows.append(report.make_row("edgemoe", "IO-QEXP", 0.5, 10, 4, {"status": "oom", "error": "killed"}))
    s = report.aggregate(rows)[("edgemoe", "IO-QEXP", "50%")]
    assert s["decode_tok_s"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert s["runs"] == 4 and s["ok_runs"] == 3 and s["statuses"] == {"ok": 3, "oom": 1} and s["errors"] == ["killed"]
    assert report.cell(s) == "2.00 (1.00–3.00)"


def test_ratio_pairs_runs_of_the_same_repeat():
    rows = [report.make_row("edgemoe", "IO-QEXP", 0.5, 10, 1, run(4.0)),
            report.make_row("edgemoe", "IO-QEXP", 0.5, 10, 2, run(9.0)),
            report.make_row("llama.cpp", "llama.cpp", 0.5, 10, 1, run(1.0)),
            report.make_row("llama.cpp", "llama.cpp", 0.5, 10, 2, run(3.0)),
            report.make_row("llama.cpp", "llama.cpp", 0.5, 10, 3, run(100.0))]  # no partner: ignored
    r = report.ratio_stats(rows, ("edgemoe", "IO-QEXP"), ("llama.cpp", "llama.cpp"), "50%")
    assert (r.median, r.min, r.max, r.n) == (3.5, 3.0, 4.0, 2)


def test_cells_say_what_happened():
    rows = [report.make_row("llama.cpp", "llama.cpp", 0.25, 10, 1,
                            {"status": "timeout", "progress": {"phase": "decode", "tokens": 3, "decode_s": 4.0}})]
    s = report.aggregate(rows)[("llama.cpp", "llama.cpp", "25%")]
    assert report.cell(s) == "timeout: 0.50 before the limit"
    assert report.cell(None) == "not run"
    refused = report.aggregate([report.make_row("edgemoe", "IO-FREE", 1.0, 10, 1, {"status": "refused"})])
    assert report.cell(refused[("edgemoe", "IO-FREE", "100%")]) == "refused"
