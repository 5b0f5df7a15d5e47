"""Low-bit copies on a miss (issue 16 section 2, after HOBBIT): what `--fallback-below W`
saves in bytes and stall on the bundled model, and what it costs in quality.

    python -m edgemoe_lab.experiments.fallback [--repeats 3] [--budgets 0.4,0.55] [--throttle 90MB/s]

The bundled model is converted once with bf16 experts and int2 small copies
(`edgemoe convert --fallback-bits 2`) and once with int3 ones. Every run loads it afresh in
this process with one compute thread and decodes held-out text teacher-forced, one token
per forward after a 32-token prefill (the decode regime: each token's misses are decided
by its own routing weights), so every configuration computes the same token stream and
speed, bytes and quality come from the same run:

    lossless         no knob (the full copy on every miss)
    int2 W / int3 W  --fallback-below W: a miss of an expert whose share of the token's
                     routing weight is below W reads the small copy instead
    ... cached S     the small copies' cache gets S of the expert cache's share of the budget
                     (default: one blob, i.e. read on every use; runtime/fallback.py)
    ... + prefetch   preloading on (the runtime's defaults) instead of off

Preloading is off unless a name says otherwise, so that the runs are deterministic. Top-2
routing with renormalised weights: the second expert's share is at most 0.5, so W = 0.5
sends every missed second expert to its small copy and never the first.

Per run: decode tok/s (forced tokens / decode seconds), bytes read per token (full and
small copies), stall per token, small-copy reads per token. Configurations alternate
within a repeat (rotated between repeats); medians over the repeats, ratios to lossless
within each repeat. Quality comes from one more run per configuration and budget over
--quality-windows windows (more tokens than the timed runs; no throttle, which changes
nothing but the time): the held-out perplexity of the forced tokens and the share of
positions whose top token equals the lossless run's. `edgemoe eval` (prefill windows of 256
tokens, where an expert falls back only if it is below W for every token of the window)
is run once for lossless and the largest W, for the held-out perplexity the CLI reports.

Writes edgemoe_lab/results/fallback.{md,json}; converted models go to edgemoe_lab/work/fallback/.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from edgemoe_lab import paths  # noqa: E402

WORK = paths.WORK / "fallback"
PREFIX, LENGTH = 32, 160  # prefill tokens, window length (the bundled model has 256 positions)


def prepare() -> tuple[dict[int, Path], dict]:
    """The bundled model with int2 and int3 small copies (reused when present) and its load info."""
    import edgemoe
    from edgemoe import assets

    WORK.mkdir(parents=True, exist_ok=True)
    dirs = {}
    for bits in (2, 3):
        out = WORK / f"bf16-fb{bits}"
        if not (out / "manifest.json").exists():
            subprocess.run([sys.executable, "-m", "edgemoe", "convert", str(assets.MODEL_DIR), str(out), "--quiet",
                            "--force", "--fallback-bits", str(bits)], check=True)
        dirs[bits] = out
    engine = edgemoe.load(dirs[2], ctx_size=256)
    info = dict(engine.info)
    engine.close()
    return dirs, info


def budget_bytes(info: dict, frac: float) -> int:
    """Everything but the expert cache (as the minimum budget counts it) plus `frac` of the
    experts' bytes: the same expert cache for every configuration (the small copies' own
    cache is carved out of it)."""
    return info["min_budget_bytes"] - info["min_cache_bytes"] + int(frac * info["expert_bytes"])


def configs(below: list[float]) -> dict[str, dict]:
    out = {"lossless": {"bits": 2}}
    for w in below:
        out[f"int2 {w:g}"] = {"bits": 2, "fallback_below": w}
        out[f"int3 {w:g}"] = {"bits": 3, "fallback_below": w}
    top = max(below)
    for share in (0.1, 0.25):
        out[f"int2 {top:g} cached {share:g}"] = {"bits": 2, "fallback_below": top, "share": share}
    out["lossless + prefetch"] = {"bits": 2, "prefetch": None}
    out[f"int2 {top:g} + prefetch"] = {"bits": 2, "fallback_below": top, "prefetch": None}
    return out


def windows_of(tokenizer, n: int) -> list[list[int]]:
    from edgemoe import assets
    from edgemoe.assets import read_documents

    out = []
    for doc in read_documents(assets.HELDOUT_TEXT)[2:]:
        ids = tokenizer.encode(doc)
        if len(ids) >= LENGTH:
            out.append(ids[:LENGTH])
        if len(out) == n:
            break
    return out


def forced_run(conv: Path, memory: int, throttle: str | None, cfg: dict, windows: list[list[int]]) -> dict:
    """Teacher forcing over `windows`, one token per forward after a PREFIX-token prefill:
    decode time, the statistics, and per position the true token's log-probability and the top token."""
    import torch

    import edgemoe
    from edgemoe.generate import prefill
    from edgemoe.runtime import fallback

    kw = {"fallback_below": cfg["fallback_below"]} if "fallback_below" in cfg else {}
    if "prefetch" not in cfg:
        kw["prefetch"] = False
    saved = fallback.CACHE_SHARE
    fallback.CACHE_SHARE = cfg.get("share", saved)
    try:
        engine = edgemoe.load(conv, memory=memory, read_throttle=throttle, ctx_size=256, threads=1, **kw)
    finally:
        fallback.CACHE_SHARE = saved
    nll, tops, decode_s, steps = [], [], 0.0, 0
    try:
        provider, model = engine.provider, engine.model
        provider.reset_stats()
        with torch.inference_mode():
            for ids in windows:
                cache = engine.new_cache()
                logits = prefill(model, ids[:PREFIX], cache)[0, -1].float()
                for t in range(PREFIX, len(ids)):
                    lp = torch.log_softmax(logits, dim=-1)
                    nll.append(-float(lp[ids[t]]))
                    tops.append(int(lp.argmax()))
                    if t + 1 < len(ids):
                        t0 = time.perf_counter()
                        provider.begin_forward(1)
                        logits = model(torch.tensor([[ids[t]]]), cache.layers)[0, -1].float()
                        decode_s += time.perf_counter() - t0
                        steps += 1
        x = provider.stats()
        x = x.to_dict() if hasattr(x, "to_dict") else x
    finally:
        engine.close()
    return {"tops": tops, "ppl": math.exp(sum(nll) / len(nll)), "tok_s": steps / decode_s,
            "stall_ms": 1000 * x["decode_stall_s_per_token"], "bytes_per_token": x["decode_bytes_read_per_token"],
            "hit_rate": x["decode_hit_rate"], "fallback_reads_per_token": x.get("decode_fallback_reads", 0) / steps,
            "fallback_bytes_saved": x.get("fallback_bytes_saved", 0), "fallback_hits": x.get("fallback_hits", 0),
            "fallback_reads": x.get("fallback_reads", 0), "steps": steps}


def eval_ppl(conv: Path, memory: int, cfg: dict) -> dict:
    """`edgemoe eval` on the held-out text at the budget, preloading off."""
    cmd = [sys.executable, "-m", "edgemoe", "eval", str(conv), "--memory", str(memory), "--no-prefetch", "--json",
           "--quiet", "--threads", "1"]
    if "fallback_below" in cfg:
        cmd += ["--fallback-below", str(cfg["fallback_below"])]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    r = json.loads(p.stdout)
    x = r.get("runtime") or {}
    return {"ppl": r["ppl"], "tokens": r["tokens"], "fallback_uses": x.get("fallback_uses")}


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budgets", default="0.4,0.55", help="expert cache as shares of the experts' bytes")
    ap.add_argument("--throttle", default="90MB/s", help="read throttle ('none': the disk as it is)")
    ap.add_argument("--below", default="0.3,0.5", help="--fallback-below thresholds")
    ap.add_argument("--windows", type=int, default=2, help=f"held-out windows of {LENGTH} tokens per timed run")
    ap.add_argument("--quality-windows", type=int, default=12, help="held-out windows for the quality runs")
    ap.add_argument("--no-eval", action="store_true", help="skip the `edgemoe eval` column")
    ap.add_argument("--out", default=str(paths.RESULTS / "fallback"), help="output path without suffix")
    ap.add_argument("--from-json", default=None, metavar="FILE", help="rewrite the report from an earlier result file")
    opts = ap.parse_args()
    if opts.from_json:
        from edgemoe.utils import format_bytes

        d = json.loads(Path(opts.from_json).read_text())
        write_md(Path(opts.out).with_suffix(".md"), d["meta"], d["summary"], format_bytes)
        return

    import torch

    import edgemoe
    from edgemoe.utils import format_bytes

    torch.set_num_threads(1)
    dirs, info = prepare()
    budgets = [float(b) for b in opts.budgets.split(",") if b]
    below = [float(w) for w in opts.below.split(",") if w]
    throttle = None if opts.throttle == "none" else opts.throttle
    cfgs = configs(below)
    names = list(cfgs)
    engine = edgemoe.load(dirs[2])
    windows = windows_of(engine.tokenizer, opts.windows)
    qwindows = windows_of(engine.tokenizer, opts.quality_windows)
    engine.close()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    runs = {f"{b:g}": {n: [] for n in names} for b in budgets}
    t_start = time.perf_counter()
    for rep in range(opts.repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for frac in budgets:
            memory = budget_bytes(info, frac)
            for name in order:
                cfg = cfgs[name]
                r = forced_run(dirs[cfg["bits"]], memory, throttle, cfg, windows)
                runs[f"{frac:g}"][name].append(r)
                gc.collect()
                print(f"repeat {rep + 1} {frac:.0%} {name:24s} {r['tok_s']:6.1f} tok/s  stall {r['stall_ms']:6.2f} "
                      f"ms  read {r['bytes_per_token'] / 1e3:7.1f} KB/tok  fallback "
                      f"{r['fallback_reads_per_token']:.2f}/tok  ppl {r['ppl']:.3f}", flush=True)
    bench_s = time.perf_counter() - t_start

    quality = {}
    for frac in budgets:
        memory = budget_bytes(info, frac)
        q = {name: forced_run(dirs[cfg["bits"]], memory, None, cfg, qwindows) for name, cfg in cfgs.items()}
        base = q["lossless"]
        quality[f"{frac:g}"] = {name: {
            "ppl": r["ppl"], "ppl_change": r["ppl"] / base["ppl"] - 1,
            "agreement": sum(a == c for a, c in zip(r["tops"], base["tops"])) / len(base["tops"]),
            "fallback_reads_per_token": r["fallback_reads_per_token"]} for name, r in q.items()}
        print(f"quality at {frac:.0%}: " + ", ".join(f"{k} {v['ppl_change']:+.2%} {v['agreement']:.1%}"
                                                      for k, v in quality[f"{frac:g}"].items()), flush=True)

    summary = {}
    for b, by_name in runs.items():
        base = by_name["lossless"]
        assert all(r["tops"] == base[0]["tops"] for r in base), f"{b}: lossless runs differ"
        rows = {}
        for name, rs in by_name.items():
            rows[name] = {
                "tok_s": med(r["tok_s"] for r in rs),
                "speedup": med(r["tok_s"] / l["tok_s"] for r, l in zip(rs, base)),
                "stall_ms": med(r["stall_ms"] for r in rs),
                "bytes_per_token": med(r["bytes_per_token"] for r in rs),
                "bytes_ratio": med(r["bytes_per_token"] / l["bytes_per_token"] for r, l in zip(rs, base)),
                "hit_rate": med(r["hit_rate"] for r in rs),
                "fallback_reads_per_token": med(r["fallback_reads_per_token"] for r in rs),
                "fallback_hits": med(r["fallback_hits"] for r in rs),
                **{f"quality_{k}": v for k, v in quality[b][name].items()},
            }
        if not opts.no_eval:
            memory = budget_bytes(info, float(b))
            ref = None
            for name, cfg in cfgs.items():
                if "share" in cfg or "prefetch" in cfg or cfg.get("fallback_below", max(below)) != max(below):
                    continue
                e = eval_ppl(dirs[cfg["bits"]], memory, cfg)
                ref = ref or e["ppl"]
                rows[name]["eval_ppl"] = e["ppl"]
                rows[name]["eval_ppl_change"] = e["ppl"] / ref - 1
                rows[name]["eval_fallback_uses"] = e["fallback_uses"]
                rows[name]["eval_tokens"] = e["tokens"]
        summary[b] = rows

    meta = {
        "command": "python -m edgemoe_lab.experiments.fallback " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), "?"),
        "loadavg_before_after": [load_before, Path("/proc/loadavg").read_text().split()[:3]],
        "bench_s": round(bench_s, 1), "repeats": opts.repeats, "throttle": opts.throttle,
        "expert_bytes": info["expert_bytes"],
        "budgets": {f"{b:g}": budget_bytes(info, b) for b in budgets},
        "windows": len(windows), "forced_tokens": len(windows) * (LENGTH - PREFIX), "prefix": PREFIX,
        "quality_windows": len(qwindows), "quality_tokens": len(qwindows) * (LENGTH - PREFIX),
        "small_copy_bytes": {bits: sum(e.length for e in edgemoe.store.manifest.read_manifest(d).fallback.experts)
                             for bits, d in dirs.items()},
    }
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for by_name in runs.values():
        for rs in by_name.values():
            for r in rs:
                r.pop("tops")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1) + "\n")
    write_md(out.with_suffix(".md"), meta, summary, format_bytes)
    print(out.with_suffix(".md").read_text())


def write_md(path: Path, meta: dict, summary: dict, format_bytes) -> None:
    small = {str(k): v for k, v in meta["small_copy_bytes"].items()}  # JSON keys are strings

    def pct(v, signed=True):
        return "-" if v is None else (f"{100 * v:+.2f}%" if signed else f"{100 * v:.1f}%")

    lines = [
        "# Low-bit copies on a miss (bundled model, issue 16 section 2)",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['cpu']}, {meta['machine']}; load average "
        f"before/after {' '.join(meta['loadavg_before_after'][0])} / {' '.join(meta['loadavg_before_after'][1])}).",
        "",
        f"bf16 experts ({format_bytes(meta['expert_bytes'])}), small copies int2 ({format_bytes(small['2'])}) "
        f"and int3 ({format_bytes(small['3'])}); "
        f"read throttle {meta['throttle']}; {meta['windows']} held-out windows teacher-forced one token per forward "
        f"after a {meta['prefix']}-token prefill ({meta['forced_tokens']} forced tokens per timed run), one compute "
        f"thread, medians of {meta['repeats']} repeats. Quality: one run over {meta['quality_windows']} windows "
        f"({meta['quality_tokens']} forced tokens) per configuration. Preloading off unless the name says + "
        "prefetch. `W`: --fallback-below (share of the token's routing weight). Hit rate: full copies (a miss "
        "served by a small copy is not a hit). `edgemoe eval` runs the held-out text in prefill windows of 256 "
        "tokens, where every expert has some token with a large share: no small copy is used there.",
        "",
    ]
    for b, rows in summary.items():
        lines += [f"## Expert cache {float(b):.0%} of the experts' bytes (budget {format_bytes(meta['budgets'][b])})",
                  "",
                  "| configuration | decode tok/s | vs lossless | stall ms/tok | read KB/tok | vs lossless | hit rate "
                  "| small-copy reads/tok | held-out ppl | change | top-1 agreement | eval ppl | change | eval small "
                  "copies used |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(
                f"| {name} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {r['stall_ms']:.2f} | "
                f"{r['bytes_per_token'] / 1e3:.1f} | {r['bytes_ratio']:.2f}x | {r['hit_rate']:.3f} | "
                f"{r['fallback_reads_per_token']:.2f} | {r['quality_ppl']:.3f} | {pct(r['quality_ppl_change'])} | "
                f"{pct(r['quality_agreement'], False)} | "
                + (f"{r['eval_ppl']:.3f} | {pct(r['eval_ppl_change'])} | {r['eval_fallback_uses'] or 0} |"
                   if "eval_ppl" in r else "- | - | - |"))
        lines.append("")
    lines += reading(summary)
    path.write_text("\n".join(lines) + "\n")


def reading(summary: dict) -> list[str]:
    """What the tables say, in numbers taken from them."""
    def span(name, key, fmt):
        vals = [rows[name][key] for rows in summary.values() if name in rows]
        lo, hi = fmt(min(vals)), fmt(max(vals))
        return lo if lo == hi else f"{lo} to {hi}"

    x = lambda v: f"{v:.2f}x"  # noqa: E731
    p = lambda v: f"{100 * v:+.2f}%"  # noqa: E731
    a = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    out = ["## Reading", ""]
    for bits in (2, 3):
        n = f"int{bits} 0.5"
        if all(n in rows for rows in summary.values()):
            out.append(f"- `--fallback-bits {bits}`, `--fallback-below 0.5` (every missed second expert read small): "
                       f"decode {span(n, 'speedup', x)} the lossless speed at {span(n, 'bytes_ratio', x)} the bytes "
                       f"per token; held-out perplexity {span(n, 'quality_ppl_change', p)}, top-1 agreement "
                       f"{span(n, 'quality_agreement', a)}.")
    cached = [n for n in next(iter(summary.values())) if "cached" in n]
    if cached and "int2 0.5" in next(iter(summary.values())):
        out.append("- Caching the small copies (a share of the expert cache for them) turns most small-copy reads "
                   "into hits but leaves fewer full copies cached: bytes per token "
                   + ", ".join(f"{n.split('cached ')[1]}: {span(n, 'bytes_ratio', x)}" for n in cached)
                   + f" against {span('int2 0.5', 'bytes_ratio', x)} read each time, more experts served small "
                   "(perplexity " + ", ".join(f"{span(n, 'quality_ppl_change', p)}" for n in cached)
                   + f" against {span('int2 0.5', 'quality_ppl_change', p)}) and no speed-up beyond the noise. So "
                   "the runtime reads a small copy on every use, into a cache of one blob (runtime/fallback.py, "
                   "CACHE_SHARE = 0).")
    out.append("- `edgemoe eval` is unchanged by the knob: it runs 256-token windows in one forward, and an expert "
               "falls back only when every token routed to it gives it a small share. The knob is a decode-time "
               "one, which is where the teacher-forced rows above measure it.")
    return out + [""]


if __name__ == "__main__":
    main()
