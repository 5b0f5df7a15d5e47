"""The EdgeMoE paper's baselines side by side: IO-FREE (every expert in RAM) and IO-EXP
(experts read on demand into a cache under a memory budget), the latter with each
eviction policy, on a random Mixtral-shaped bf16 checkpoint whose experts are several
times the budget.

    python -m edgemoe_lab.experiments.offload_baselines --budget 350MB --tokens 48 --repeats 3

Every run is `edgemoe generate OUT --json ...` in a fresh process, after dropping the
page cache (root: /proc/sys/vm/drop_caches), with the configurations interleaved within
each repeat; medians over repeats are reported, and the IO-FREE/IO-EXP speed ratio is
taken within each repeat. The belady run replays the routing trace recorded by the first
IO-FREE run (same prompt, same greedy tokens). Writes
edgemoe_lab/results/offload_baselines.{md,json}; working files go to edgemoe_lab/work/offload/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgemoe_lab import paths
from edgemoe_lab.peer.machine import drop_caches, quiet_repeat

WORK = paths.WORK / "offload"
RESULTS = paths.RESULTS

# Mixtral-shaped: 8 layers x 8 experts of 17.3 MB (bf16) = 1.1 GB of experts, ~75 MB resident.
VOCAB, HIDDEN, INTER, LAYERS, EXPERTS, TOP_K, HEADS, KV_HEADS = 8000, 1024, 2816, 8, 8, 2, 16, 4
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"


def make_checkpoint(path: Path) -> bool:
    """The random checkpoint (the lab's writer, written once): routers spread wider than the
    rest so that routing depends on the token. Returns whether it was written now."""
    from edgemoe_lab.checkpoints import MixtralSpec, write_random_mixtral

    before = (path / "bench_model.json").stat().st_mtime_ns if (path / "bench_model.json").exists() else None
    spec = MixtralSpec(layers=LAYERS, experts=EXPERTS, top_k=TOP_K, hidden=HIDDEN, inter=INTER, heads=HEADS,
                       kv_heads=KV_HEADS, head_dim=HIDDEN // HEADS)
    write_random_mixtral(path, spec, vocab_size=VOCAB)
    return (path / "bench_model.json").stat().st_mtime_ns != before


def run(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "edgemoe", "generate", *map(str, args)]
    dropped = drop_caches()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    out = json.loads(proc.stdout)
    out["wall_s"] = wall
    out["page_cache_dropped"] = dropped
    return out


def summarize(runs: list[dict]) -> dict:
    med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
    s = lambda r: r["stats"]  # noqa: E731
    return {
        "decode_tps": med(lambda r: s(r)["decode_tps"]),
        "prefill_s": med(lambda r: s(r)["prefill_s"]),
        "hit_rate": med(lambda r: s(r)["hit_rate"]),
        "decode_hit_rate": med(lambda r: s(r)["decode_hit_rate"]),
        "bytes_read_per_token": med(lambda r: s(r)["bytes_read_per_token"]),
        "decode_bytes_read_per_token": med(lambda r: s(r)["decode_bytes_read_per_token"]),
        "read_s": med(lambda r: s(r)["read_s"]),
        "stall_s": med(lambda r: s(r)["stall_s"]),
        "decode_stall_s": med(lambda r: s(r)["decode_stall_s"]),
        "decode_s": med(lambda r: s(r)["decode_s"]),
        "peak_rss_bytes": med(lambda r: s(r)["peak_rss_bytes"]),
        "rss_over_baseline_bytes": med(lambda r: s(r)["rss_over_baseline_bytes"]),
        "budget_used_bytes": med(lambda r: s(r)["budget_used_bytes"]),
        "load_s": med(lambda r: r["load"]["load_s"]),
        "wall_s": med(lambda r: r["wall_s"]),
        "io": runs[0]["stats"]["io"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="350MB")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policies", default="lru,lfu,edgemoe,belady")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each repeat, wait up to SECONDS for other processes to leave the CPUs idle")
    opts = ap.parse_args()

    from edgemoe.utils import format_bytes, parse_size

    WORK.mkdir(parents=True, exist_ok=True)
    hf, conv, trace = WORK / "hf", WORK / "conv", WORK / "trace.npz"
    if make_checkpoint(hf) or not (conv / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "edgemoe", "convert", hf, conv, "--quiet", "--force"], check=True)
    manifest = json.loads((conv / "manifest.json").read_text())
    expert_bytes = sum(-(-e["size"] // 4096) * 4096 for e in manifest["experts"])
    budget = parse_size(opts.budget)
    common = ["-p", PROMPT, "-n", opts.tokens, "--ignore-eos", "--json"]
    configs = {"IO-FREE": ["--mode", "io-free"]}
    for p in opts.policies.split(","):
        configs[f"IO-EXP {p}"] = ["--mode", "io-exp", "--memory", budget, "--cache-policy", p] + (
            ["--trace", trace] if p == "belady" else [])
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    quiet = []
    for rep in range(opts.repeats):
        if opts.wait_quiet:
            quiet.append(quiet_repeat(opts.wait_quiet, rep))
        for name, flags in configs.items():
            extra = ["--record-trace", trace] if name == "IO-FREE" and rep == 0 else []
            r = run([conv, *flags, *common, *extra])
            runs[name].append(r)
            print(f"repeat {rep + 1} {name:16s} decode {r['stats']['decode_tps']:6.2f} tok/s  "
                  f"hit rate {r['stats']['hit_rate']:.3f}", flush=True)
    ref = runs["IO-FREE"][0]["token_ids"]
    for name, rs in runs.items():
        for r in rs:
            assert r["token_ids"] == ref, f"{name} generated different tokens"
    summary = {name: summarize(rs) for name, rs in runs.items()}
    for name in summary:
        ratios = [f["stats"]["decode_tps"] / r["stats"]["decode_tps"] for f, r in zip(runs["IO-FREE"], runs[name])]
        summary[name]["io_free_speedup"] = statistics.median(ratios)

    cmd = f"python -m edgemoe_lab.experiments.offload_baselines --budget {opts.budget} --tokens {opts.tokens} --repeats {opts.repeats}"
    if opts.wait_quiet:
        cmd += f" --wait-quiet {opts.wait_quiet:g}"
    resident = runs["IO-FREE"][0]["load"]["resident_bytes"]
    meta = {
        "command": cmd,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "model": f"random Mixtral-shaped bf16: {LAYERS} layers x {EXPERTS} experts (top-{TOP_K}), hidden {HIDDEN}, "
                 f"expert intermediate {INTER}, vocab {VOCAB}",
        "resident_bytes": resident,
        "expert_bytes": expert_bytes,
        "budget_bytes": budget,
        "experts_over_budget": expert_bytes / budget,
        "loadavg_before_after": [load_before, Path("/proc/loadavg").read_text().split()[:3]],
        "quiet_before_repeats": quiet,
        "page_cache_dropped": all(r["page_cache_dropped"] for rs in runs.values() for r in rs),
        "prompt_tokens": runs["IO-FREE"][0]["stats"]["prompt_tokens"],
        "generated_tokens": opts.tokens,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "offload_baselines.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))

    lines = [
        "# IO-FREE vs IO-EXP (EdgeMoE paper baselines)",
        "",
        f"Command: `{cmd}` ({meta['date']}, {meta['machine']}).",
        "",
        f"Model: {meta['model']}. Resident weights {format_bytes(resident)}, experts {format_bytes(expert_bytes)}; "
        f"IO-EXP budget {format_bytes(budget)} (experts are {meta['experts_over_budget']:.1f}x the budget). "
        f"Prompt {meta['prompt_tokens']} tokens, {opts.tokens} generated (greedy, identical tokens in every run). "
        f"Page cache dropped before every run: {'yes' if meta['page_cache_dropped'] else 'NO'}. "
        f"Medians of {opts.repeats} repeats, configurations interleaved; speed ratios taken within each repeat. "
        f"The machine is shared: load average {' '.join(meta['loadavg_before_after'][0])} before, "
        f"{' '.join(meta['loadavg_before_after'][1])} after.",
        "",
        "| configuration | decode tok/s | IO-FREE speedup | decode hit rate | read / decode token | "
        "decode stall s (of decode s) | hit rate, all | read / token, all | prefill s | peak RSS | RSS over baseline | "
        "budget used |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        used = "-" if name == "IO-FREE" else format_bytes(s["budget_used_bytes"])
        lines.append(
            f"| {name} | {s['decode_tps']:.2f} | {s['io_free_speedup']:.2f}x | {100 * s['decode_hit_rate']:.1f}% | "
            f"{format_bytes(s['decode_bytes_read_per_token'])} | {s['decode_stall_s']:.2f} ({s['decode_s']:.2f}) | "
            f"{100 * s['hit_rate']:.1f}% | {format_bytes(s['bytes_read_per_token'])} | {s['prefill_s']:.2f} | "
            f"{format_bytes(s['peak_rss_bytes'])} | {format_bytes(s['rss_over_baseline_bytes'])} | {used} |"
        )
    f = summary["IO-FREE"]
    lines += [
        "",
        f"IO-FREE reads every expert at load ({format_bytes(expert_bytes)}, load {f['load_s']:.1f} s) and none while "
        "generating. IO-EXP reads experts with O_DIRECT (`io` = "
        f"{summary[next(k for k in summary if k != 'IO-FREE')]['io']}) into a slab sized from the budget. "
        "Decode columns count only the one-token forwards after the prompt; \"all\" columns include the prefill "
        "(which reads most experts once). Stall is the time the compute thread waited for experts (no "
        "prefetching yet, so nearly all read time is stall). Speedup = IO-FREE decode tok/s / this row's.",
        "",
        "Routing of a random checkpoint is close to uniform, so these hit rates are a pessimistic floor: real "
        "models route with skew and locality. belady replays the recorded routing (the offline optimum at "
        "layer-request granularity), an upper bound for any online policy.",
    ]
    (RESULTS / "offload_baselines.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
