"""Writing `edgemoe bench`'s results: results.json, results.md and the plots."""

from __future__ import annotations

import json
from pathlib import Path

from edgemoe.utils import format_bytes
from . import report
from .configs import CONFIGS

LOSSY = {c.name for c in CONFIGS if c.lossy}  # rows with a quality cost
BASE = {c.name: c.base for c in CONFIGS if c.base}  # a lossy row's lossless configuration
ORDER = [c.name for c in CONFIGS if c.name != "Belady"] + ["Belady"]

GOALS = {"100%": 1.0, "50%": 8.0, "25%": 10.0}  # edgemoe / llama.cpp decode speed (issues 15 and 16)
LLAMA = ("llama.cpp", "llama.cpp")



def _reserved_note(m: dict) -> str:
    """How edgemoe's KV cache and workspace reservations enter its limit."""
    reserved = m["edgemoe_overhead"].get("reserved_bytes")
    if not reserved:
        return ""
    if m.get("limit_adds_overhead"):
        return (f"Its limit adds its KV cache and compute workspace reservations ({format_bytes(reserved)}) to the "
                "budget, as llama.cpp's adds its measured KV cache and compute buffers, so `--memory` = budget + "
                f"{format_bytes(reserved)} and the budget is the model's bytes for both engines. ")
    return f"`--memory` holds its KV cache and compute workspace reservations ({format_bytes(reserved)}). "

def base_agreements(rows: list[dict]) -> None:
    """Set each lossy row's `base_agreement`: the share of positions where its greedy choice
    equals its lossless base configuration's (same budget, the same repeat where there is
    one; edgemoe's choices under teacher forcing do not depend on the cache)."""
    for r in rows:
        base = BASE.get(r["config"])
        if not base or r["status"] != "ok" or not r.get("greedy_ids"):
            continue
        cands = [b for b in rows if b["config"] == base and b["budget"] == r["budget"] and b["status"] == "ok"
                 and b.get("greedy_ids")]
        ref = next((b for b in cands if b["repeat"] == r["repeat"]), cands[0] if cands else None)
        if ref is not None:
            pairs = list(zip(r["greedy_ids"], ref["greedy_ids"]))
            r["base_agreement"] = round(sum(a == b for a, b in pairs) / len(pairs), 4) if pairs else None


def quality(s: dict | None) -> str:
    """A quality cell: a lossy row's agreement with its base, another's forced agreement."""
    if not s:
        return "-"
    key = "base_agreement" if s["config"] in LOSSY else "forced_agreement"
    return report.fmt_stat(s[key], digits=3) if s.get(key) else "-"


def lower_bounds(rows: list[dict], summary: dict, labels: list[str], bw: dict) -> dict:
    """Per budget: max(IO-FREE decode time per token, Belady decode bytes per token / disk
    bandwidth), as seconds per token and as the tok/s it allows."""
    free = summary.get(("edgemoe", "IO-FREE", "unlimited"))
    free_s = 1 / free["decode_tok_s"]["median"] if free and free.get("decode_tok_s") else None
    out = {}
    for b in labels:
        if b == "unlimited":
            continue
        bel = summary.get(("edgemoe", "Belady", b))
        per_tok = bel["decode_bytes_read_per_token"]["median"] if bel and bel.get("decode_bytes_read_per_token") else None
        io_s = per_tok / bw["bytes_per_s"] if per_tok is not None and bw.get("bytes_per_s") else None
        parts = [x for x in (free_s, io_s) if x is not None]
        bound = max(parts) if parts else None
        out[b] = {"io_free_s_per_token": free_s, "belady_decode_bytes_per_token": per_tok,
                  "belady_decode_hit_rate": bel["decode_hit_rate"]["median"] if bel and bel.get("decode_hit_rate") else None,
                  "io_s_per_token": io_s, "bound_s_per_token": bound,
                  "bound_tok_s": 1 / bound if bound else None,
                  "limited_by": None if bound is None else ("compute (IO-FREE)" if bound == free_s else "disk reads")}
    return out


def goals(rows: list[dict], summary: dict, labels: list[str]) -> list[dict]:
    out = []
    for b, goal in GOALS.items():
        if b not in labels:
            continue
        llama = summary.get(("llama.cpp", "llama.cpp", b))
        cands = [s for (e, c, bb), s in summary.items() if e == "edgemoe" and bb == b and c not in ("Belady",)
                 and s["ok_runs"]]
        entry = {"budget": b, "goal_ratio": goal, "llama_cpp_decode_tok_s": llama["decode_tok_s"] if llama else None}
        if llama is None or llama["statuses"].get("unavailable"):
            entry.update(met=None, verdict="llama.cpp is not part of this run" if llama is None else
                         f"llama.cpp unavailable: {llama['errors'][0] if llama['errors'] else '?'}")
        elif not cands:
            entry.update(met=False, verdict="no edgemoe configuration finished at this budget")
        elif not llama or not llama["ok_runs"]:
            partial = llama and llama.get("partial_decode_tok_s")
            best = max(cands, key=lambda s: s["decode_tok_s"]["median"])
            entry.update(best_config=best["config"], edgemoe_decode_tok_s=best["decode_tok_s"])
            if partial:
                r = best["decode_tok_s"]["median"] / partial["median"]
                entry.update(ratio=r, met=r >= goal,
                             verdict=f"llama.cpp did not finish ({', '.join(llama['statuses'])}); against the rate it "
                                     f"reached before the limit the ratio is {r:.1f}x")
            else:
                entry.update(met=None, verdict="llama.cpp has no result at this budget")
        else:
            best = max(cands, key=lambda s: (report.ratio_stats(rows, ("edgemoe", s["config"]), LLAMA, b) or
                                             report.Stat(0, 0, 0, 0)).median)
            r = report.ratio_stats(rows, ("edgemoe", best["config"]), LLAMA, b)
            entry.update(best_config=best["config"], edgemoe_decode_tok_s=best["decode_tok_s"],
                         ratio=r.median if r else None, ratio_min=r.min if r else None, ratio_max=r.max if r else None,
                         met=bool(r and r.median >= goal))
            entry["verdict"] = f"{best['config']} at {r.median:.2f}x llama.cpp" if r else "no paired runs"
            if best["config"] in LOSSY:
                entry["verdict"] += (f" (lossy: greedy agreement with {BASE.get(best['config'])} "
                                     f"{report.fmt_stat(best.get('base_agreement'), pct=True)})")
        out.append(entry)
    return out


def explain(goal: dict, rows: list[dict], summary: dict, bounds: dict, bw: dict) -> list[str]:
    """Measured reasons for where edgemoe stands against llama.cpp at one budget."""
    b = goal["budget"]
    why = []
    refusals = sorted({r["error"] for r in rows if r["engine"] == "edgemoe" and r["budget"] == b
                       and r["status"] == "refused" and r["config"] != "IO-FREE" and r.get("error")})
    if not goal.get("best_config"):
        why += [f"edgemoe could not run: {e}" for e in refusals[:2]]
        return why
    free = summary.get(("edgemoe", "IO-FREE", "unlimited"))
    llama_free = summary.get(("llama.cpp", "llama.cpp", "unlimited"))
    llama = summary.get(("llama.cpp", "llama.cpp", b))
    if free and free.get("decode_tok_s") and llama_free and llama_free.get("decode_tok_s"):
        f, lf = free["decode_tok_s"]["median"], llama_free["decode_tok_s"]["median"]
        why.append(f"compute: without any memory limit edgemoe (IO-FREE) decodes {f:.2f} tok/s and llama.cpp {lf:.2f} "
                   f"tok/s ({f / lf:.2f}x): edgemoe cannot beat llama.cpp by more than this factor times how much "
                   f"llama.cpp slows down under the limit"
                   + (f" ({lf / llama['decode_tok_s']['median']:.1f}x here), i.e. {f / llama['decode_tok_s']['median']:.1f}x"
                      if llama and llama.get("decode_tok_s") else ""))
    best = summary.get(("edgemoe", goal["best_config"], b))
    if best and best.get("decode_bytes_read_per_token") and bw.get("bytes_per_s"):
        per_tok = best["decode_bytes_read_per_token"]["median"]
        hit = best["decode_hit_rate"]["median"] if best.get("decode_hit_rate") else None
        why.append(f"reads: {goal['best_config']} reads {format_bytes(per_tok)} per decode token"
                   + (f" (decode hit rate {100 * hit:.0f}%)" if hit is not None else "")
                   + f", {per_tok / bw['bytes_per_s']:.3f} s at the measured {format_bytes(bw['bytes_per_s'])}/s")
    if llama and llama.get("bytes_read"):
        toks = next((r["generated_tokens"] for r in rows if r["config"] == "llama.cpp" and r["budget"] == b
                     and r["status"] == "ok"), None)
        if toks:
            why.append(f"llama.cpp: its memory-mapped weights no longer fit, so it reads "
                       f"{format_bytes(llama['bytes_read']['median'])} in the run ({format_bytes(llama['bytes_read']['median'] / toks)} "
                       "per generated token) through page faults")
    bd = bounds.get(b)
    if bd and bd.get("bound_tok_s") and llama and llama.get("decode_tok_s"):
        why.append(f"lower bound: even an optimal cache with free compute overlap allows at most "
                   f"{bd['bound_tok_s']:.2f} tok/s here ({bd['limited_by']}), "
                   f"{bd['bound_tok_s'] / llama['decode_tok_s']['median']:.1f}x llama.cpp")
    return why


def write_results(out_dir: Path, meta: dict, rows: list[dict], labels: list[str], fractions, size: int, bw: dict,
                  log=print) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_agreements(rows)
    summary = report.aggregate(rows)
    bounds = lower_bounds(rows, summary, labels, bw)
    goal_rows = goals(rows, summary, labels)
    for g in goal_rows:
        if g.get("met") is not None:
            g["why"] = explain(g, rows, summary, bounds, bw)
    ratios, prefill_ratios = {}, {}
    for (e, c, b), s in summary.items():
        if e != "edgemoe" or c == "Belady":
            continue
        for key, into in (("decode_tok_s", ratios), ("prefill_tok_s", prefill_ratios)):
            r = report.ratio_stats(rows, (e, c), LLAMA, b, key)
            if r:
                into.setdefault(b, {})[c] = r.to_dict()
    plots = report.plots(rows, summary, labels, out_dir, size)
    doc = {"meta": meta, "rows": rows, "summary": list(summary.values()), "ratios_vs_llama_cpp": ratios,
           "prefill_ratios_vs_llama_cpp": prefill_ratios, "lower_bound": bounds, "goals": goal_rows, "plots": plots}
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    (out_dir / "results.md").write_text(markdown(meta, rows, summary, labels, bounds, goal_rows, ratios, plots, bw,
                                                    prefill_ratios))
    log(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}" + "".join(f", {out_dir / p}" for p in plots))


def _configs_in_order(summary: dict) -> list[tuple[str, str]]:
    order = ORDER
    seen = []
    for (e, c, _b) in summary:
        if (e, c) not in seen:
            seen.append((e, c))
    return sorted(seen, key=lambda ec: order.index(ec[1]) if ec[1] in order else 99)


def markdown(meta, rows, summary, labels, bounds, goal_rows, ratios, plots, bw, prefill_ratios=None) -> str:
    m = meta
    mach = m["machine"]
    L = [
        "# edgemoe vs llama.cpp vs transformers under a memory limit",
        "",
        f"Command: `{m['command']}` ({m['date']}, {m['duration_s'] // 60} min).",
        "",
        f"Machine: {mach['cpu']}, {mach['cpus']} CPUs ({', '.join(mach['simd']) or 'no SIMD flags read'}), "
        f"{format_bytes(mach['memory_bytes'])} RAM, {mach['platform']}. Threads per engine: {m['threads']}. "
        f"Load average at the start {m['loadavg_start'][0] if m['loadavg_start'] else '?'}, at the end "
        f"{m['loadavg_end'][0] if m['loadavg_end'] else '?'}"
        + (f", before the runs {m['loadavg_during']['min']:.2f}–{m['loadavg_during']['max']:.2f} "
           f"(median {m['loadavg_during']['median']:.2f})" if m.get("loadavg_during") else "") + ".",
        "",
    ]
    busy = m.get("loadavg_during") and m["loadavg_during"]["median"] > 0.5
    if busy:
        L += [f"**Noisy:** other processes shared the {mach['cpus']} CPUs and the disk during this run (load average "
              f"median {m['loadavg_during']['median']:.2f}); absolute speeds are low and vary, ratios taken within a "
              "repeat are more reliable. Rerun the command on a quiet machine (`--wait-quiet 600`).", ""]
    cg = m["cgroup"]
    if cg["available"]:
        L.append(f"Memory limits: {cg['controller']}; every run is a fresh process in a fresh cgroup whose limit "
                 "covers its anonymous memory and the page cache of what it reads (swap limited to the same value).")
    else:
        L.append(f"**Memory limits were NOT enforced**: {cg['reason']}. The budgets below are labels only.")
    L.append(f"Page cache dropped before every run: {'yes' if m['page_cache_drop'] else 'NO (not root)'}.")
    L += [
        "",
        f"Model: {m['model']}. Budgets are fractions of the quantized model size, {format_bytes(m['size_bytes'])} "
        f"({m['size_of']}); " + ("each engine's cgroup limit is the budget PLUS its own measured process overhead "
                                 "(--limit-adds-overhead: the budget covers the model's bytes only). " if
                                 m.get("limit_adds_overhead") else "the cgroup limit is the same for every engine. ")
        + "edgemoe's converted model: "
        f"{format_bytes(m['edgemoe_store']['bytes'])} ({format_bytes(m['edgemoe_store']['resident_bytes'])} resident "
        f"weights ({m['edgemoe_store'].get('resident_format', 'bf16')}; IO-EXP: bf16) + {format_bytes(m['edgemoe_store']['expert_bytes'])} of "
        f"{'/'.join(m['edgemoe_store']['expert_format'])} experts).",
        "",
        f"Token stream: the same {m['token_stream']['prompt_tokens']} prompt tokens and the same "
        f"{m['token_stream']['generated_tokens']} generated tokens in every run (the greedy output of an unconstrained "
        "edgemoe IO-FREE run, fed to every engine), so every engine does the same forwards. Prefill = the prompt's "
        "forward; decode = the other generated tokens, one forward each. Context window: the prompt plus the "
        "generated tokens rounded up to 256 positions for every engine (llama.cpp's n_ctx, edgemoe's ctx_size), so "
        "none reserves KV-cache memory for a longer context than another. Repeats: "
        f"{m['repeats']}, configurations alternating (the order rotates every repeat); time limit "
        f"{m['timeout_s']:.0f} s per run. Disk: {format_bytes(bw['bytes_per_s'])}/s measured ({bw['mode']} sequential "
        f"reads of {format_bytes(bw['chunk_bytes'])}). Each row of results.json also has `forced_agreement`: how "
        "often the engine's own greedy choice equals the token fed next. It is 1.0 for the lossless edgemoe rows "
        "on the reference's store by construction (same weights and arithmetic); the rows on another store (a "
        "bitwidth plan) and the peers differ by their quantization, and a random model's logits are nearly flat, so "
        f"low agreement there is expected. The lossy rows ({', '.join(sorted(LOSSY)) or 'none'}, marked) each have a "
        "lossless base configuration on the same store; their quality column (`base_agreement`) is the share of "
        "positions where their greedy choice equals the base's, fed the same tokens: 1.0 means the knob changed no "
        "greedy choice.",
        "",
        f"edgemoe's `--memory` = limit − {format_bytes(m['edgemoe_overhead']['bytes'])} measured process overhead "
        f"(python + torch baseline {format_bytes(m['edgemoe_overhead']['baseline_rss_bytes'])}, tokenizer) "
        f"− {format_bytes(m['edgemoe_overhead']['margin_bytes'])} margin. " + _reserved_note(m)
        + (f"transformers' accelerate `max_memory` = limit − {format_bytes(m['transformers_overhead_bytes'])} "
           "(its interpreter with torch, transformers and accelerate imported) − margin − 10%." if
           m.get("transformers_overhead_bytes") else ""),
        "",
        "## Decode tokens/s (median, min–max over repeats)",
        "",
        "| engine | configuration | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for e, c in _configs_in_order(summary):
        if c == "Belady":
            continue
        L.append(f"| {e} | {c} | " + " | ".join(report.cell(summary.get((e, c, b))) for b in labels) + " |")
    if ratios:
        limited = [b for b in labels if b in ratios]
        L += ["", "## edgemoe decode speed / llama.cpp's (same budget, within each repeat)", "",
              "Agreement (quality): a lossy row's greedy-choice agreement with its lossless base; another row's "
              "forced agreement with the token stream (1.0 by construction on the reference's store).", "",
              "| configuration | lossy | agreement with | " + " | ".join(f"{b} | agreement" for b in limited) + " |",
              "|---|---|---|" + "---|---|" * len(limited)]
        names = sorted({c for r in ratios.values() for c in r}, key=lambda c: ORDER.index(c) if c in ORDER else 99)
        for c in names:
            L.append(f"| {c} | {'**lossy**' if c in LOSSY else 'no'} | {BASE.get(c, 'the token stream')} | "
                     + " | ".join(f"{report.fmt_stat(ratios.get(b, {}).get(c), unit='x')} | "
                                  f"{quality(summary.get(('edgemoe', c, b)))}" for b in limited) + " |")
    if prefill_ratios:
        have = [b for b in labels if b in prefill_ratios]
        L += ["", "## edgemoe prefill speed / llama.cpp's (same budget, within each repeat)", "",
              f"Prefill: the {meta['token_stream']['prompt_tokens']}-token prompt's forward, with the page cache "
              "dropped before the run: under a limit it includes what each engine reads from disk during it (edgemoe's "
              "expert misses; llama.cpp's page faults on its memory-mapped file); IO-FREE read every expert at load.",
              "", "| configuration | " + " | ".join(have) + " |", "|---|" + "---|" * len(have)]
        names = sorted({c for r in prefill_ratios.values() for c in r}, key=lambda c: ORDER.index(c) if c in ORDER else 99)
        for c in names:
            L.append(f"| {c} | " + " | ".join(report.fmt_stat(prefill_ratios[b].get(c), unit="x") for b in have) + " |")
    L += ["", "## Goals (issues 15 and 16)", "", "| budget | goal | llama.cpp decode tok/s | best edgemoe | ratio | met |",
          "|---|---|---|---|---|---|"]
    for g in goal_rows:
        met = {True: "yes", False: "**no**", None: "not evaluated"}[g.get("met")]
        llama = report.fmt_stat(g.get("llama_cpp_decode_tok_s")) if g.get("llama_cpp_decode_tok_s") else "-"
        best = (f"{g['best_config']} {report.fmt_stat(g['edgemoe_decode_tok_s'])} tok/s" if g.get("best_config") else "-")
        spread = g.get("ratio_min") is not None and g["ratio_min"] != g["ratio_max"]
        ratio = (f"{g['ratio']:.2f}x" + (f" ({g['ratio_min']:.2f}–{g['ratio_max']:.2f})" if spread else "")
                 if g.get("ratio") else "-")
        L.append(f"| {g['budget']} | ≥ {g['goal_ratio']}x | {llama} | {best} | {ratio} | {met}: {g['verdict']} |")
    for g in goal_rows:
        if g.get("why"):
            L += ["", f"Why, at {g['budget']}:"] + [f"- {w}" for w in g["why"]]
    if bounds:
        L += ["", "## Lower bound on edgemoe's decode time per token", "",
              "max(IO-FREE decode time per token, Belady decode misses × expert bytes ÷ measured disk bandwidth): the "
              "compute of a run that reads nothing, or the reads that even an optimal cache of this size must do.", "",
              "| budget | IO-FREE s/token | Belady decode hit rate | Belady bytes read / decode token | reads s/token | "
              "bound s/token | at most tok/s | limited by |", "|---|---|---|---|---|---|---|---|"]
        for b, x in bounds.items():
            def f(v, d=4):
                return "-" if v is None else f"{v:.{d}f}"
            hit = x["belady_decode_hit_rate"]
            per_tok = x["belady_decode_bytes_per_token"]
            L.append(f"| {b} | {f(x['io_free_s_per_token'])} | {'-' if hit is None else f'{100 * hit:.1f}%'} | "
                     f"{'-' if per_tok is None else format_bytes(per_tok)} | {f(x['io_s_per_token'])} | "
                     f"{f(x['bound_s_per_token'])} | {f(x['bound_tok_s'], 2)} | {x['limited_by'] or '-'} |")
    L += ["", "## Every configuration at every budget", "",
          "Peak RSS is the process's own high-water mark (VmHWM: anonymous + file-backed pages it mapped); cgroup "
          "peak is everything charged to its cgroup, page cache included. Bytes read: the process's `read_bytes` "
          "from /proc/PID/io (what it made the block layer read: O_DIRECT reads, page-cache misses, mmap faults).", "",
          "| budget | engine | configuration | status | decode tok/s | forced agreement | agreement with base | "
          "prefill tok/s | peak RSS | cgroup peak | bytes read | read / decode token | hit rate (decode) | "
          "stall s (decode) | memory given |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in labels:
        for e, c in _configs_in_order(summary):
            s = summary.get((e, c, b))
            if s is None:
                continue
            per_tok = "-"
            if s.get("bytes_read") and s["ok_runs"]:
                toks = next((r["generated_tokens"] for r in rows if r["config"] == c and r["budget"] == b
                             and r["status"] == "ok"), None)
                if toks:
                    per_tok = format_bytes(s["bytes_read"]["median"] / toks)
            st = ", ".join(f"{k} x{v}" for k, v in s["statuses"].items())
            mem = next((r["memory_arg_bytes"] for r in rows if r["config"] == c and r["budget"] == b), None)
            hit = "-"
            if s.get("hit_rate"):
                hit = f"{report.fmt_stat(s['hit_rate'], pct=True)} ({report.fmt_stat(s['decode_hit_rate'], pct=True)})"
            stall = "-"
            if s.get("stall_s"):
                stall = f"{report.fmt_stat(s['stall_s'])} ({report.fmt_stat(s['decode_stall_s'])})"
            L.append(f"| {b} | {e} | {c}{' (lossy)' if c in LOSSY else ''} | {st} | {report.cell(s)} | "
                     f"{report.fmt_stat(s.get('forced_agreement'), digits=3)} | "
                     f"{report.fmt_stat(s.get('base_agreement'), digits=3)} | {report.cell(s, 'prefill_tok_s')} | "
                     f"{report.fmt_stat(s.get('peak_rss_bytes'), bytes_=True)} | "
                     f"{report.fmt_stat(s.get('cgroup_peak_bytes'), bytes_=True)} | "
                     f"{report.fmt_stat(s.get('bytes_read'), bytes_=True)} | {per_tok} | {hit} | {stall} | "
                     f"{'-' if mem is None else format_bytes(mem)} |")
    errors = [(s["engine"], s["config"], s["budget"], err) for s in summary.values() for err in s["errors"]]
    if errors:
        L += ["", "## Runs that did not finish", ""]
        for e, c, b, err in errors:
            L.append(f"- {e} {c} at {b}: {err}")
    if m.get("unavailable"):
        L += ["", "## Not available in this installation", ""]
        L += [f"- {k}: {v}" for k, v in m["unavailable"].items()]
    if m.get("notes"):
        L += ["", "## Notes", ""] + [f"- {n}" for n in m["notes"]]
    if plots:
        L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    peers = m.get("peers") or {}
    if peers:
        L += ["", "## Peers", ""]
        for k, v in peers.items():
            L.append(f"- {k}: " + ", ".join(f"{a} {b}" for a, b in v.items()))
    return "\n".join(L) + "\n"
