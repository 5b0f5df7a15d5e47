"""The EdgeMoE paper's ablation on the bundled trained model: what each technique adds to
decode time per token (TPOT) under a memory budget well below the experts' size, on three
kinds of storage.

    python -m edgemoe_lab.experiments.ablation [--repeats 3] [--tokens 128] [--budget-frac 0.30] [--wait-quiet 120]

Configurations (every one runs `edgemoe generate DIR --json` in a fresh process, with the
page cache dropped before it, OMP_NUM_THREADS=1 so that torch computes on one core and
the expert loader has the other):

    IO-FREE                  bf16 experts, all read into RAM at load (no reads while decoding)
    IO-EXP                   bf16 experts on demand into the cache (LRU), no preloading
    + bitwidth plan          the mixed-bit plan's experts, otherwise as IO-EXP
    + preloading             ... plus expert prediction and preloading (the runtime's defaults)
    + EdgeMoE cache policy   ... plus the paper's eviction score instead of LRU  (= EdgeMoE)
    IO-QEXP                  uniform int4 experts on demand (LRU), no preloading
    EdgeMoE+cache-routing    = EdgeMoE, plus cache-aware routing (--cache-aware-routing 0.1; lossy:
                             its quality cost is measured in edgemoe_lab/results/prefetch_pays.md)
    EdgeMoE+fallback         = EdgeMoE, plus int2 small copies read on a miss of an expert with
                             under half of the token's routing weight (--fallback-below 0.5;
                             lossy: its quality cost is measured in edgemoe_lab/results/fallback.md)
    EdgeMoE+all              = EdgeMoE with both knobs

Storage: the real disk (O_DIRECT, page cache dropped) and the store reader's bandwidth
throttle at 90 MB/s (a Raspberry Pi's SD card) and 550 MB/s (a Jetson's SATA SSD). The
budget is the same for every configuration but IO-FREE: what the model needs besides its
expert cache (resident weights, KV cache, workspace) plus --budget-frac of the plan's expert
bytes.

The mixed-bit plan comes from `edgemoe profile` + `edgemoe plan --max-loss 2%` (issue 5)
when those commands exist, else from --plan FILE. The predictor is fitted on a routing
trace of the plan model over the calibration text (`edgemoe trace` + `edgemoe fit-predictor`).
Configurations alternate within each repeat (rotated between repeats); medians of the
repeats are reported and the speed ratios are taken within each repeat. Writes
edgemoe_lab/results/ablation.{md,json,png}; working files go to edgemoe_lab/work/ablation/.

    python -m edgemoe_lab.experiments.ablation --model switch [--repeats 3] [--tokens 64] ...

runs the same rows on the paper's own architecture: a Switch Transformers encoder-decoder
shaped like switch-base-8 (12 + 12 layers, MoE in every other layer of both stacks, 8
ungated experts, top-1 with capacity) with random weights and d_model 256, d_ff 1024
(switch-base-8: 768, 3072), so that its 96 experts fit this machine. Each run is a fresh
process of this script (`--seq2seq-run`, standing in for `edgemoe generate`, which does
not run encoder-decoders yet): the source is encoded once, then the decoder samples.
`edgemoe profile` does not run encoder-decoders either, so the bitwidth row uses a fixed
mixed plan (int4 in each stack's first MoE layer, int2 elsewhere: close to the bit mix
`edgemoe plan` chose for the bundled model), and preloading uses the gate look-ahead
(fitting a predictor needs traces of one stack at a time). Writes
edgemoe_lab/results/ablation_switch.{md,json,png}; working files go to edgemoe_lab/work/ablation/switch/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgemoe_lab.paths import RESULTS, WORK as LAB_WORK
from edgemoe_lab.peer.machine import drop_caches, quiet_repeat

WORK = LAB_WORK / "ablation"

CONDITIONS = {"disk": None, "90MB/s": "90MB/s", "550MB/s": "550MB/s"}
ROWS = ["IO-FREE", "IO-EXP", "+ bitwidth plan", "+ preloading", "+ EdgeMoE cache policy", "IO-QEXP"]
# bundled model only (the Switch-T runner takes neither knob)
LOSSY = ["EdgeMoE+cache-routing", "EdgeMoE+fallback", "EdgeMoE+all"]
FALLBACK_BELOW = 0.5
CACHE_ROUTING = 0.1  # the margin that paid in prefetch_pays.md
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def edgemoe(*args, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "edgemoe", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if check and proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    return proc


def prepare(opts) -> dict:
    """Converted models, the plan, the fitted predictor. Reused when present."""
    from edgemoe import assets

    WORK.mkdir(parents=True, exist_ok=True)
    src = assets.MODEL_DIR
    dirs = {"bf16": WORK / "bf16", "int4": WORK / "int4", "plan": WORK / "plan"}
    if not (dirs["bf16"] / "manifest.json").exists():
        edgemoe("convert", src, dirs["bf16"], "--quiet", "--force")
    if not (dirs["int4"] / "manifest.json").exists():
        edgemoe("convert", src, dirs["int4"], "--bits", "4", "--quiet", "--force")
    plan = Path(opts.plan) if opts.plan else WORK / "plan.json"
    how = f"given: {opts.plan}" if opts.plan else None
    if not opts.plan and not plan.exists():
        if edgemoe("plan", "--help", check=False).returncode != 0:
            raise SystemExit("no 'edgemoe plan' here: give a plan with --plan FILE")
        profile = WORK / "profile.json"
        if not profile.exists():
            edgemoe("profile", src, "-o", profile, "--quiet")
        edgemoe("plan", profile, "--max-loss", opts.max_loss, "-o", plan, "--quiet", "--no-plot")
    if how is None:
        how = f"`edgemoe profile` + `edgemoe plan --max-loss {opts.max_loss}`"
    if not (dirs["plan"] / "manifest.json").exists() or opts.plan:
        edgemoe("convert", src, dirs["plan"], "--plan", plan, "--quiet", "--force")
    calib = WORK / "calib.npz"
    if not (dirs["plan"] / "predictor.npz").exists():
        edgemoe("trace", dirs["plan"], "-o", calib, *(["--max-tokens", opts.calib_tokens] if opts.calib_tokens else []))
        edgemoe("fit-predictor", dirs["plan"], "--trace", calib, "--json")
    # The plan's experts again, with int2 small copies (same experts: the same fitted predictor).
    dirs["plan-fb"] = WORK / "plan-fb"
    if not (dirs["plan-fb"] / "manifest.json").exists() or opts.plan:
        edgemoe("convert", src, dirs["plan-fb"], "--plan", plan, "--fallback-bits", "2", "--quiet", "--force")
    shutil.copyfile(dirs["plan"] / "predictor.npz", dirs["plan-fb"] / "predictor.npz")
    return {"dirs": dirs, "plan": plan, "plan_how": how}


# switch-base-8's layout, narrower (see the module notes).
SWITCH = dict(vocab_size=32128, d_model=256, d_kv=64, num_heads=4, d_ff=1024, num_layers=12, num_decoder_layers=12,
              num_sparse_encoder_layers=6, num_sparse_decoder_layers=6, num_experts=8, expert_capacity=64,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=True)
SOURCE_TOKENS = 64  # the encoded source (random ids: the model is random too)
SWITCH_CTX = 256


def prepare_switch(opts) -> dict:
    """The random Switch-T checkpoint, its bf16, int4 and mixed-plan conversions. Reused
    when present."""
    import torch
    import transformers as tf

    from edgemoe.models.switch_transformers import ModelArgs
    from edgemoe.store.convert import convert

    work = WORK / "switch"
    work.mkdir(parents=True, exist_ok=True)
    src = work / "hf"
    if not (src / "config.json").exists():
        torch.manual_seed(0)
        model = tf.SwitchTransformersForConditionalGeneration(tf.SwitchTransformersConfig(**SWITCH))
        model.to(torch.bfloat16).save_pretrained(src)
        del model
    args = ModelArgs.from_dict(json.loads((src / "config.json").read_text()))
    firsts = [args.encoder_moe()[0], args.num_hidden_layers + args.decoder_moe()[0]]
    plan = work / "plan.json"
    plan.write_text(json.dumps({"version": 1, "default": "int2", "layers": {str(l): "int4" for l in firsts}}))
    dirs = {"bf16": work / "bf16", "int4": work / "int4", "plan": work / "plan"}
    for name, kw in (("bf16", {}), ("int4", {"bits": 4}), ("plan", {"plan": plan})):
        if not (dirs[name] / "manifest.json").exists():
            convert(src, dirs[name], force=True, **kw)
    how = "a fixed plan: int4 in the first MoE layer of each stack, int2 elsewhere (no `edgemoe profile` for seq2seq yet)"
    return {"dirs": dirs, "plan": plan, "plan_how": how}


def seq2seq_run(argv: list[str]) -> None:
    """One configuration on an encoder-decoder model in this (fresh) process: what
    `edgemoe generate --json` prints, for the flags the rows use. The source is
    SOURCE_TOKENS random ids; decoding samples as the bundled-model rows do."""
    import torch

    from edgemoe import seq2seq
    from edgemoe.runtime.loading import load_converted
    from edgemoe.sample import make_sampler

    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--memory")
    ap.add_argument("--mode")
    ap.add_argument("--cache-policy")
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--read-throttle")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--ctx-size", type=int, default=SWITCH_CTX)
    a = ap.parse_args(argv)
    model, info = load_converted(a.dir, memory=a.memory, mode=a.mode, cache_policy=a.cache_policy,
                                 prefetch=False if a.no_prefetch else None, read_throttle=a.read_throttle,
                                 ctx_size=a.ctx_size)
    provider = next(model.moe_blocks()).provider
    g = torch.Generator().manual_seed(0)
    source = torch.randint(3, model.args.vocab_size, (SOURCE_TOKENS,), generator=g).tolist()
    sampler = make_sampler(0.8, top_p=0.95, seed=0)
    tokens, times = [], []
    for tok in seq2seq.generate_step(model, source, sampler, max_tokens=a.n, cache=model.make_cache(a.ctx_size)):
        times.append(time.perf_counter())
        tokens.append(tok)
    stats = provider.stats().to_dict()  # the JSON content of the typed statistics
    stats.update(generated_tokens=len(tokens), prompt_tokens=len(source), decode_s=times[-1] - times[0])
    provider.close()
    print(json.dumps({"stats": stats, "token_ids": tokens, "load": info}, default=str))


def manifest_bytes(d: Path) -> tuple[int, dict]:
    m = json.loads((d / "manifest.json").read_text())
    counts: dict[str, int] = {}
    for e in m["experts"]:
        counts[e["format"]] = counts.get(e["format"], 0) + 1
    return sum(-(-e["size"] // 4096) * 4096 for e in m["experts"]), counts


def configs(dirs: dict, budget: int) -> dict[str, tuple[Path, list]]:
    mem = ["--memory", budget]
    return {
        "IO-FREE": (dirs["bf16"], ["--mode", "io-free"]),
        "IO-EXP": (dirs["bf16"], mem + ["--cache-policy", "lru", "--no-prefetch"]),
        "+ bitwidth plan": (dirs["plan"], mem + ["--cache-policy", "lru", "--no-prefetch"]),
        "+ preloading": (dirs["plan"], mem + ["--cache-policy", "lru"]),
        "+ EdgeMoE cache policy": (dirs["plan"], mem + ["--cache-policy", "edgemoe"]),
        "IO-QEXP": (dirs["int4"], mem + ["--cache-policy", "lru", "--no-prefetch"]),
        **({"EdgeMoE+cache-routing": (dirs["plan"], mem + ["--cache-policy", "edgemoe", "--cache-aware-routing",
                                                           CACHE_ROUTING]),
            "EdgeMoE+fallback": (dirs["plan-fb"], mem + ["--cache-policy", "edgemoe", "--fallback-below",
                                                         FALLBACK_BELOW]),
            "EdgeMoE+all": (dirs["plan-fb"], mem + ["--cache-policy", "edgemoe", "--fallback-below", FALLBACK_BELOW,
                                                    "--cache-aware-routing", CACHE_ROUTING])}
           if "plan-fb" in dirs else {}),
    }


def run_seq2seq(*args) -> subprocess.CompletedProcess:
    """This script's --seq2seq-run in a fresh process."""
    cmd = [sys.executable, "-m", __spec__.name, "--seq2seq-run", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    return proc


def run_one(d: Path, flags: list, throttle: str | None, common: list, seq2seq: bool = False) -> dict:
    args = [d, *flags, *common] + (["--read-throttle", throttle] if throttle else [])
    dropped = drop_caches()
    t0 = time.perf_counter()
    proc = run_seq2seq(*args) if seq2seq else edgemoe("generate", *args)
    out = json.loads(proc.stdout)
    out["wall_s"] = time.perf_counter() - t0
    out["page_cache_dropped"] = dropped
    s = out["stats"]
    out["tpot_ms"] = 1000 * s["decode_s"] / max(s["generated_tokens"] - 1, 1)
    return out


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> dict:
    s = lambda r, k, default=None: r["stats"].get(k, default)  # noqa: E731
    dec = lambda r: max(r["stats"]["generated_tokens"] - 1, 1)  # noqa: E731
    return {
        "tpot_ms": med(r["tpot_ms"] for r in runs),
        "decode_hit_rate": med(s(r, "decode_hit_rate", 1.0) for r in runs),
        "decode_bytes_read_per_token": med(s(r, "decode_bytes_read_per_token", 0) for r in runs),
        "decode_stall_ms_per_token": med(1000 * s(r, "decode_stall_s_per_token", 0.0) for r in runs),
        "decode_prefetch_hits_per_token": med(s(r, "decode_prefetch_hits", 0) / dec(r) for r in runs),
        "decode_prefetch_wasted_bytes_per_token": med(s(r, "decode_prefetch_wasted_bytes_per_token", 0) for r in runs),
        "prefetch_hits": med(s(r, "prefetch_hits", 0) for r in runs),
        "prefetch_wasted_bytes": med(s(r, "prefetch_wasted_bytes", 0) for r in runs),
        "decode_predictor_recall": med(s(r, "decode_predictor_recall") for r in runs),
        "decode_predictor_precision": med(s(r, "decode_predictor_precision") for r in runs),
        "rss_over_baseline_bytes": med(s(r, "rss_over_baseline_bytes", 0) for r in runs),
        "budget_used_bytes": med(s(r, "budget_used_bytes", 0) for r in runs),
        "io": runs[0]["stats"].get("io"),
    }


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(summary)
    rows = list(summary[conds[0]])
    fig, axes = plt.subplots(1, len(conds), figsize=(4.2 * len(conds), 4.2), sharey=False, squeeze=False)
    axes = axes[0]
    colors = ["#999999", "#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd", "#17becf"][: len(rows)]
    for ax, cond in zip(axes, conds):
        vals = [summary[cond][r]["tpot_ms"] for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=colors)
        for b, v, r in zip(bars, vals, rows):
            x = summary[cond][r].get("vs_io_exp")
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}" + (f"\n{x:.2f}x" if x and r != "IO-EXP" else ""),
                    ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r.replace("+ ", "+").replace(" cache policy", "\npolicy") for r in rows],
                           rotation=35, ha="right", fontsize=8)
        ax.set_title(f"storage: {cond}", fontsize=10)
        ax.set_ylabel("decode ms / token (TPOT)")
        ax.margins(y=0.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# The EdgeMoE paper's decode speed-ups of full EdgeMoE on Switch Transformers, over its
# models and devices (the ranges issue 14 quotes).
PAPER = {"vs_io_exp": (2.55, 3.25), "vs_io_qexp": (1.19, 2.12)}


def paper_comparison(summary: dict, conds: list[str]) -> list[str]:
    """How full EdgeMoE's measured speed-ups compare with the paper's ranges."""
    lines = ["## Against the paper", "",
             "| storage | EdgeMoE vs IO-EXP (paper 2.55-3.25x) | EdgeMoE vs IO-QEXP (paper 1.19-2.12x) |", "|---|---|---|"]
    for cond in conds:
        s = summary[cond]["+ EdgeMoE cache policy"]
        cells = []
        for key in ("vs_io_exp", "vs_io_qexp"):
            lo, hi = PAPER[key]
            v = s[key]
            where = "within" if lo <= v <= hi else ("below" if v < lo else "above")
            cells.append(f"{v:.2f}x ({where})")
        lines.append(f"| {cond} | {cells[0]} | {cells[1]} |")
    lines += ["", "What differs from the paper's setting: the weights are random, so routing skew and its "
              "persistence from token to token (what the cache and the predictor exploit) are not a trained "
              "model's; the model is narrower (1 MB bf16 experts instead of switch-base-8's 9.4 MB); the bitwidth "
              "plan is fixed rather than fitted to accuracy; preloading uses the gate look-ahead (no fitted "
              "predictor for encoder-decoders yet); and the 2 CPUs are shared with other work. Where reads stall "
              "little (this machine's disk is fast), every ratio is small: the "
              "throttled rows are the paper's IO-bound regime.", ""]
    return lines


def main() -> None:
    if sys.argv[1:2] == ["--seq2seq-run"]:  # one run of the Switch-T rows (a fresh process)
        return seq2seq_run(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("bundled", "switch"), default="bundled",
                    help="the bundled trained MoE, or a random Switch-T-shaped encoder-decoder (the paper's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128, help="tokens to generate per run (default 128)")
    ap.add_argument("--budget-frac", type=float, default=0.30,
                    help="expert cache = this share of the plan's expert bytes (default 0.30)")
    ap.add_argument("--plan", default=None, help="a plan file for the bitwidth row (default: edgemoe profile + plan)")
    ap.add_argument("--max-loss", default="2%", help="loss tolerance for edgemoe plan (default 2%%)")
    ap.add_argument("--calib-tokens", type=int, default=None, help="tokens of calibration text to fit the predictor on")
    ap.add_argument("--conditions", default=",".join(CONDITIONS), help="storage conditions to run")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each repeat, wait up to SECONDS for other processes to leave the CPUs idle")
    opts = ap.parse_args()

    from edgemoe import assets
    from edgemoe.assets import read_documents
    from edgemoe.utils import format_bytes

    switch = opts.model == "switch"
    prep = prepare_switch(opts) if switch else prepare(opts)
    dirs = prep["dirs"]
    plan_bytes, plan_counts = manifest_bytes(dirs["plan"])
    bf16_bytes, _ = manifest_bytes(dirs["bf16"])
    int4_bytes, _ = manifest_bytes(dirs["int4"])
    resident = (dirs["bf16"] / "resident.safetensors").stat().st_size
    if switch:
        info = json.loads(run_seq2seq(dirs["bf16"], "-n", 2).stdout)["load"]
        common = ["-n", opts.tokens]
    else:
        info = json.loads(edgemoe("generate", dirs["bf16"], "-p", "x", "-n", "1", "--json").stdout)["load"]
        prompt = read_documents(assets.HELDOUT_TEXT)[1][:400]
        common = ["-p", prompt, "-n", opts.tokens, "--ignore-eos", "--temperature", "0.8", "--top-p", "0.95",
                  "--seed", "0", "--json"]
    resident = info["resident_bytes"]
    # What the budget holds besides the expert cache: the resident weights, the KV cache
    # and the compute workspace (as the minimum budget counts them).
    fixed = info["min_budget_bytes"] - info["min_cache_bytes"]
    budget = fixed + int(opts.budget_frac * plan_bytes)
    cfgs = configs(dirs, budget)
    rows = [r for r in ROWS + LOSSY if r in cfgs]
    conds = [c for c in opts.conditions.split(",") if c]
    runs: dict[str, dict[str, list]] = {c: {r: [] for r in rows} for c in conds}
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    quiet = []
    for rep in range(opts.repeats):
        if opts.wait_quiet:
            quiet.append(quiet_repeat(opts.wait_quiet, rep))
        order = rows[rep % len(rows):] + rows[: rep % len(rows)]
        for cond in conds:
            for name in order:
                d, flags = cfgs[name]
                r = run_one(d, flags, CONDITIONS[cond], common, switch)
                runs[cond][name].append(r)
                s = r["stats"]
                print(f"repeat {rep + 1} {cond:8s} {name:24s} TPOT {r['tpot_ms']:7.2f} ms  "
                      f"hit {s.get('decode_hit_rate', 1.0):.3f}  stall {1000 * s.get('decode_stall_s_per_token', 0):6.2f} "
                      f"ms/tok  recall {s.get('decode_predictor_recall', '-')}", flush=True)
    # Same model, same seed: same tokens whatever the cache, policy, preloading and storage
    # (the lossy rows aside).
    by_dir: dict[str, list] = {}
    for cond in conds:
        for name in ROWS:
            key = str(cfgs[name][0]) if name != "IO-FREE" else "bf16"
            for r in runs[cond][name]:
                by_dir.setdefault(key if name != "IO-FREE" else str(dirs["bf16"]), []).append(r["token_ids"])
    for key, toks in by_dir.items():
        assert all(t == toks[0] for t in toks), f"runs of {key} generated different tokens"

    summary = {}
    for cond in conds:
        summary[cond] = {name: summarize(runs[cond][name]) for name in rows}
        for name in rows:
            for ref, label in (("IO-EXP", "vs_io_exp"), ("IO-QEXP", "vs_io_qexp")):
                ratios = [a["tpot_ms"] / b["tpot_ms"] for a, b in zip(runs[cond][ref], runs[cond][name])]
                summary[cond][name][label] = statistics.median(ratios)

    cmd = (f"python -m edgemoe_lab.experiments.ablation {'--model switch ' if switch else ''}--repeats {opts.repeats} --tokens {opts.tokens} --budget-frac {opts.budget_frac:g}"
           + (f" --plan {opts.plan}" if opts.plan else "") + (f" --wait-quiet {opts.wait_quiet:g}" if opts.wait_quiet else "")
           + (f" --calib-tokens {opts.calib_tokens}" if opts.calib_tokens else ""))
    plan_json = json.loads(prep["plan"].read_text())
    meta = {
        "command": cmd, "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "cpu": next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                     if l.startswith("model name")), "?"),
        "resident_bytes": resident, "budget_bytes": budget, "cache_bytes": budget - fixed,
        "expert_bytes": {"bf16": bf16_bytes, "int4": int4_bytes, "plan": plan_bytes},
        "plan_formats": plan_counts, "plan_how": prep["plan_how"], "plan_meta": plan_json.get("meta"),
        "prompt_tokens": runs[conds[0]]["IO-EXP"][0]["stats"]["prompt_tokens"], "generated_tokens": opts.tokens,
        "loadavg_before_after": [load_before, Path("/proc/loadavg").read_text().split()[:3]],
        "quiet_before_repeats": quiet,
        "page_cache_dropped": all(r["page_cache_dropped"] for c in runs.values() for rs in c.values() for r in rs),
        "predictor": runs[conds[0]]["+ preloading"][0]["stats"].get("predictor"),
        "prefetch_experts": runs[conds[0]]["+ preloading"][0]["stats"].get("prefetch_experts"),
        "prefetch_layers": runs[conds[0]]["+ preloading"][0]["stats"].get("prefetch_layers"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "ablation_switch" if switch else "ablation"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    plot(summary, RESULTS / f"{stem}.png",
         f"{'random Switch-T-shaped encoder-decoder' if switch else 'bundled tiny MoE'}, budget {format_bytes(budget)} "
         f"(cache {format_bytes(budget - fixed)}), labels: TPOT ms and speed-up over IO-EXP")

    formats = ", ".join(f"{f} x{n}" for f, n in sorted(plan_counts.items()))
    lines = [
        "# Ablation: what each EdgeMoE technique adds (" + ("Switch-T-shaped model, the paper's architecture)"
                                                             if switch else "bundled model)"),
        "",
        f"Command: `{cmd}` ({meta['date']}, {meta['machine']}, {meta['cpu']}).",
        "",
        (f"Model: a Switch Transformers encoder-decoder shaped like switch-base-8 ({SWITCH['num_layers']} + "
         f"{SWITCH['num_decoder_layers']} layers, MoE in every other layer of both stacks: 12 MoE layers x "
         f"{SWITCH['num_experts']} ungated experts, top-1 with capacity) with random weights, d_model "
         f"{SWITCH['d_model']} and d_ff {SWITCH['d_ff']} (switch-base-8: 768 and 3072). " if switch else
         "Model: the bundled tiny MoE (8 MoE layers x 8 experts, top-2, hidden 128). ")
        + f"Experts: bf16 "
        f"{format_bytes(bf16_bytes)}, uniform int4 {format_bytes(int4_bytes)}, mixed-bit plan {format_bytes(plan_bytes)} "
        f"({formats}; plan from {prep['plan_how']}). Budget for every row but IO-FREE: {format_bytes(budget)} = "
        + f"resident weights {format_bytes(resident)}, KV cache for {SWITCH_CTX if switch else info['ctx_size']} "
        f"tokens and workspace ({format_bytes(fixed)} together)"
        + f" + an expert cache of {format_bytes(budget - fixed)} "
        f"({100 * opts.budget_frac:.0f}% of the plan's experts, {100 * (budget - fixed) / bf16_bytes:.0f}% of the "
        f"bf16 experts, {100 * (budget - fixed) / int4_bytes:.0f}% of the int4 ones). "
        + (f"Source: {meta['prompt_tokens']} random token ids, encoded once (its MoE layers read experts as a "
           f"prefill does); {opts.tokens} target tokens sampled " if switch else
           f"Prompt: {meta['prompt_tokens']} tokens of held-out text; {opts.tokens} tokens sampled ")
        + "(temperature 0.8, top-p 0.95, seed 0: the same tokens in every run of one model). Each run is a fresh "
        + ("`edgemoe_lab/experiments/ablation.py --seq2seq-run` process (edgemoe.seq2seq on the offloaded runtime) " if switch else
           "`edgemoe generate --json` process ")
        + f"with OMP_NUM_THREADS=1, the page cache dropped before it "
        f"({'yes' if meta['page_cache_dropped'] else 'NO: not root'}); medians of {opts.repeats} repeats with the "
        f"configurations alternating, ratios taken within each repeat. Preloading: the {meta['predictor']} predictor, "
        f"{meta['prefetch_experts']} experts, up to {meta['prefetch_layers']} MoE layers ahead (the defaults). Load "
        f"average {' '.join(meta['loadavg_before_after'][0])} before, {' '.join(meta['loadavg_before_after'][1])} after "
        "(2 cores, shared with other work).",
        "",
    ]
    for cond in conds:
        title = {"disk": "real disk (O_DIRECT, page cache dropped)", "90MB/s": "throttled to 90 MB/s (Raspberry Pi SD card)",
                 "550MB/s": "throttled to 550 MB/s (Jetson SSD)"}.get(cond, cond)
        lines += [f"## Storage: {title}", "",
                  "| configuration | TPOT ms | vs IO-EXP | vs IO-QEXP | decode hit rate | read / token | stall ms / token | "
                  "prefetch hits / token | wasted prefetch / token | predictor recall (precision) | peak RSS over baseline |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name in rows:
            s = summary[cond][name]
            rec = (f"{100 * s['decode_predictor_recall']:.1f}% ({100 * s['decode_predictor_precision']:.1f}%)"
                   if s["decode_predictor_recall"] is not None else "-")
            pf = name in ("+ preloading", "+ EdgeMoE cache policy", *LOSSY)
            bold = "**" if name == "+ EdgeMoE cache policy" else ""
            lines.append(
                f"| {bold}{name}{bold} | {bold}{s['tpot_ms']:.2f}{bold} | {bold}{s['vs_io_exp']:.2f}x{bold} | "
                f"{s['vs_io_qexp']:.2f}x | {100 * s['decode_hit_rate']:.1f}% | "
                f"{format_bytes(s['decode_bytes_read_per_token'])} | {s['decode_stall_ms_per_token']:.2f} | "
                f"{s['decode_prefetch_hits_per_token']:.2f} | "
                f"{format_bytes(s['decode_prefetch_wasted_bytes_per_token']) if pf else '-'} | {rec} | "
                f"{format_bytes(s['rss_over_baseline_bytes'])} |")
        lines.append("")
    if "EdgeMoE+cache-routing" in rows:
        lines += [f"EdgeMoE+cache-routing is lossy (--cache-aware-routing {CACHE_ROUTING:g}: a cached expert whose "
                  "router score is within the margin of a missing one's takes its place): its quality cost on this "
                  "model (held-out perplexity) is in `prefetch_pays.md`. EdgeMoE+all has both knobs.", ""]
    if "EdgeMoE+fallback" in rows:
        n2 = plan_counts.get("int2", 0)
        lines += [f"EdgeMoE+fallback is lossy (--fallback-below {FALLBACK_BELOW:g}, int2 small copies): its "
                  "quality cost (held-out perplexity, top-1 agreement) is in `fallback.md`, measured on bf16 experts. "
                  f"Here the plan already stores {n2} of the {sum(plan_counts.values())} experts at int2, whose "
                  "small copy is no smaller and is never read: the knob acts on the others only.", ""]
    if switch:
        lines += paper_comparison(summary, conds)
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
