"""Result rows, their aggregation, and the written report (JSON, markdown, PNG plots).

A row is one run. The JSON keeps every row; the tables show, per configuration and
budget, the median over repeats with the minimum and maximum. Rows that did not finish
(refused, out of memory, time limit) keep their status and error, and a time-limited
run also keeps the decode rate it reached before it was stopped.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from edgemoe.utils import format_bytes

# Every row has these keys (None where an engine cannot tell).
ROW_KEYS = (
    "engine", "config", "budget", "budget_fraction", "limit_bytes", "repeat", "status", "error",
    "decode_tok_s", "prefill_tok_s", "prefill_s", "decode_s", "prompt_tokens", "generated_tokens",
    "peak_rss_bytes", "cgroup_peak_bytes", "bytes_read",
    "hit_rate", "decode_hit_rate", "stall_s", "decode_stall_s", "engine_bytes_read", "decode_bytes_read_per_token",
    "memory_arg_bytes", "load_s", "wall_s", "forced_agreement", "limit_hits", "oom_kills", "page_cache_dropped",
    "loadavg_before", "partial_decode_tok_s", "tokens_done",
    "greedy_ids", "base_agreement",  # the engine's greedy choice per position; a lossy row's agreement with its base
)
NUMERIC = ("decode_tok_s", "prefill_tok_s", "peak_rss_bytes", "cgroup_peak_bytes", "bytes_read", "hit_rate",
           "decode_hit_rate", "stall_s", "decode_stall_s", "decode_bytes_read_per_token", "load_s", "wall_s",
           "partial_decode_tok_s", "forced_agreement", "base_agreement")


def budget_label(fraction: float | None) -> str:
    return "unlimited" if fraction is None else f"{round(100 * fraction):d}%"


def make_row(engine: str, config: str, fraction: float | None, limit: int | None, repeat: int, out: dict,
             memory_arg: int | None = None) -> dict:
    """One row from a runner result."""
    es = out.get("engine_stats") or {}
    io = out.get("proc_io") or {}
    ps = out.get("proc_status") or {}
    row = dict.fromkeys(ROW_KEYS)
    row.update(
        engine=engine, config=config, budget=budget_label(fraction), budget_fraction=fraction, limit_bytes=limit,
        repeat=repeat, status=out.get("status", "error"), error=out.get("error"),
        decode_tok_s=out.get("decode_tok_s"), prefill_tok_s=out.get("prefill_tok_s"),
        prefill_s=out.get("prefill_s"), decode_s=out.get("decode_s"),
        prompt_tokens=out.get("prompt_tokens"), generated_tokens=out.get("generated_tokens"),
        peak_rss_bytes=ps.get("VmHWM"), cgroup_peak_bytes=out.get("cgroup_peak_bytes"),
        bytes_read=io.get("read_bytes"),
        hit_rate=es.get("hit_rate"), decode_hit_rate=es.get("decode_hit_rate"), stall_s=es.get("stall_s"),
        decode_stall_s=es.get("decode_stall_s"), engine_bytes_read=es.get("bytes_read"),
        decode_bytes_read_per_token=es.get("decode_bytes_read_per_token"),
        memory_arg_bytes=memory_arg, load_s=out.get("load_s"), wall_s=out.get("wall_s"),
        forced_agreement=out.get("forced_agreement"), limit_hits=out.get("limit_hits"),
        oom_kills=out.get("oom_kills"), page_cache_dropped=out.get("page_cache_dropped"),
        loadavg_before=out.get("loadavg_before"), greedy_ids=out.get("greedy_ids"),
    )
    progress = out.get("progress") or {}
    if row["status"] != "ok" and progress.get("phase") == "decode":
        done = int(progress.get("tokens") or 0)
        row["tokens_done"] = done
        if done > 1 and progress.get("decode_s"):
            row["partial_decode_tok_s"] = round((done - 1) / progress["decode_s"], 4)
    if out.get("log_tail") and row["status"] != "ok":
        row["log_tail"] = out["log_tail"][-800:]
    return row


@dataclass
class Stat:
    median: float
    min: float
    max: float
    n: int

    def to_dict(self) -> dict:
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n}


def stat(values) -> Stat | None:
    v = [float(x) for x in values if x is not None]
    if not v:
        return None
    return Stat(statistics.median(v), min(v), max(v), len(v))


def aggregate(rows: list[dict]) -> dict:
    """{(engine, config, budget): summary} with medians/min/max over finished runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["engine"], r["config"], r["budget"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        statuses: dict[str, int] = {}
        for r in rs:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        s = {"engine": key[0], "config": key[1], "budget": key[2], "budget_fraction": rs[0]["budget_fraction"],
             "limit_bytes": rs[0]["limit_bytes"], "runs": len(rs), "ok_runs": len(ok), "statuses": statuses,
             "errors": sorted({r["error"] for r in rs if r.get("error")})}
        for k in NUMERIC:
            st = stat(r.get(k) for r in (ok if k != "partial_decode_tok_s" else rs))
            s[k] = st.to_dict() if st else None
        out[key] = s
    return out


def ratio_stats(rows: list[dict], num: tuple[str, str], den: tuple[str, str], budget: str,
                key: str = "decode_tok_s") -> Stat | None:
    """`key` (decode or prefill tok/s) of `num` over `den` (engine, config) at `budget`,
    taken within each repeat (both finished), then median/min/max over repeats."""
    def by_rep(ec):
        return {r["repeat"]: r[key] for r in rows
                if (r["engine"], r["config"]) == ec and r["budget"] == budget and r["status"] == "ok"
                and r[key]}

    a, b = by_rep(num), by_rep(den)
    return stat(a[k] / b[k] for k in a if k in b)


def fmt_stat(s: dict | None, unit: str = "", digits: int = 2, bytes_: bool = False, pct: bool = False) -> str:
    if not s:
        return "-"

    def f(x):
        if bytes_:
            return format_bytes(x)
        if pct:
            return f"{100 * x:.1f}%"
        return f"{x:.{digits}f}{unit}"

    if s["n"] == 1 or s["min"] == s["max"]:
        return f(s["median"])
    return f"{f(s['median'])} ({f(s['min'])}–{f(s['max'])})"


def cell(summary: dict | None, key: str = "decode_tok_s", **kw) -> str:
    """A table cell: the median (min–max), or what happened instead."""
    if summary is None:
        return "not run"
    if summary["ok_runs"]:
        return fmt_stat(summary.get(key), **kw)
    st = ", ".join(f"{k}" + (f" x{v}" if v > 1 else "") for k, v in summary["statuses"].items())
    partial = summary.get("partial_decode_tok_s")
    if key == "decode_tok_s" and partial:
        return f"{st}: {fmt_stat(partial)} before the limit"
    return st


def plots(rows: list[dict], summary: dict, budgets: list[str], out_dir, size_bytes: int | None) -> list[str]:
    """decode.png (decode tok/s per configuration and budget, log scale) and memory.png
    (peak memory charged to each run's cgroup, with the limits). Returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    order = ["IO-FREE", "IO-EXP", "IO-QEXP", "LRU-only", "EdgeMoE", "llama.cpp", "transformers"]
    configs = []
    for s in summary.values():
        if s["config"] not in configs and s["config"] != "Belady":
            configs.append(s["config"])
    configs.sort(key=lambda c: order.index(c) if c in order else len(order))
    written = []
    for name, key, ylabel, log in (("decode.png", "decode_tok_s", "decode tokens/s (median, min-max)", True),
                                   ("memory.png", "cgroup_peak_bytes", "peak memory of the run, GB", False)):
        fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(budgets) * max(1, len(configs)) / 3), 4.2))
        width = 0.8 / max(1, len(configs))
        for i, cfg in enumerate(configs):
            xs, ys, lo, hi, marks = [], [], [], [], []
            for j, b in enumerate(budgets):
                s = next((v for v in summary.values() if v["config"] == cfg and v["budget"] == b), None)
                x = j + (i - (len(configs) - 1) / 2) * width
                st = s.get(key) if s else None
                if st is None and s is not None and key == "decode_tok_s" and s.get("partial_decode_tok_s"):
                    st = s["partial_decode_tok_s"]
                if st is None and s is not None and key == "cgroup_peak_bytes":
                    st = stat(r.get("cgroup_peak_bytes") for r in rows
                              if r["config"] == cfg and r["budget"] == b)
                    st = st.to_dict() if st else None
                if st is None:
                    if s is not None:
                        marks.append((x, ", ".join(s["statuses"])))
                    continue
                scale = 1e9 if key == "cgroup_peak_bytes" else 1
                xs.append(x)
                ys.append(st["median"] / scale)
                lo.append((st["median"] - st["min"]) / scale)
                hi.append((st["max"] - st["median"]) / scale)
            bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=cfg)
            for x, text in marks:
                ax.text(x, 0.02, text, rotation=90, ha="center", va="bottom", fontsize=7,
                        transform=ax.get_xaxis_transform(),
                        color=bars.patches[0].get_facecolor() if bars.patches else "k")
        if key == "cgroup_peak_bytes" and size_bytes:
            for j, b in enumerate(budgets):
                if b != "unlimited":
                    lim = size_bytes * float(b.rstrip("%")) / 100 / 1e9
                    ax.hlines(lim, j - 0.45, j + 0.45, colors="k", linestyles="dashed", linewidth=1)
        ax.set_xticks(range(len(budgets)))
        ax.set_xticklabels([f"budget {b}" for b in budgets])
        ax.set_ylabel(ylabel)
        if log and any(p.get_height() > 0 for p in ax.patches):
            ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
        ax.set_title("edgemoe bench: " + ("decode speed" if key == "decode_tok_s" else
                                          "peak memory charged to the cgroup (dashed: the limit)"), fontsize=10)
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)
    return written
