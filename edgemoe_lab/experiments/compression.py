"""Expert pruning, merging and bitwidth plans on one quality vs bytes curve (issue 19, section 5).

    python -m edgemoe_lab.experiments.compression            # resumable: steps whose outputs exist are skipped
    python -m edgemoe_lab.experiments.compression --redo convert   # e.g. after the store changed (sharing): reconvert,
                                                 # re-measure bytes and decode speed

On the bundled model (edgemoe/assets/tiny-moe), every configuration is made with the edgemoe
commands themselves (subprocesses; the exact command lines are kept in the JSON):

- uniform int8/int4/int3/int2: `edgemoe convert MODEL OUT --format F`;
- the bitwidth plan alone: `edgemoe profile` -> `edgemoe plan --max-loss P` -> `convert --plan`,
  at several tolerances P;
- prune at 12.5/25/50 %: `edgemoe prune MODEL P --drop F` -> `convert`; and at 25/50 % with
  per-layer budgets (`--per-layer`: experts ranked over all layers);
- merge to 6 and 4 experts per layer: `edgemoe merge MODEL M --experts-per-layer N` -> `convert`;
- prune + plan and merge + plan (the composition): prune/merge -> `profile` of the smaller model ->
  `plan --target-size S` -> `convert --plan`, with S the stored expert bytes of a plan-alone point,
  so that each composed point is compared with the plan alone at equal (or fewer) bytes.

Held-out perplexity is `edgemoe eval OUT --mode io-free` (float32, the whole held-out text, windows
of the model's context) computed in this process with per-window NLLs, so that two
configurations are compared paired on the same windows (two standard errors).

Expert bytes are measured from what `convert` wrote: the distinct blobs of the manifest (an
expert entry sharing another's blob, as a merged group's members do, is counted once),
cross-checked with `edgemoe info`. The JSON also has the bytes if blobs with identical contents
were stored once (`if_shared_bytes`); the table shows them only where they differ. A change to
the store's code (edgemoe/store, edgemoe/quant) reconverts by itself; `--redo STAGE` redoes a
stage and every later one.

Decode speed: `edgemoe generate OUT --memory B --ctx-size 256 --read-throttle 90MB/s --json`
on one fixed budget B for every configuration: 40 % of the bf16 experts' bytes plus what the
runtime needs besides the expert cache (`min_budget_bytes - min_cache_bytes` of the bf16
conversion, from `edgemoe info --json`). Every configuration runs once per round, rounds
alternate the order, and the median of the rounds is reported, with the decode hit rate and
bytes read per token from the same runs.

Writes edgemoe_lab/results/compression.{md,json,png}; working files go to edgemoe_lab/work/compression/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgemoe_lab import paths  # noqa: E402
from edgemoe_lab.peer.machine import cpu_model

ROOT = paths.ROOT
WORK = paths.WORK / "compression"
RESULTS = paths.RESULTS
MODEL = ROOT / "edgemoe" / "assets" / "tiny-moe"

UNIFORM = ["int8", "int4", "int3", "int2"]
# Plan alone, --max-loss on the calibration text. 8 % is past the plan's floor on this model
# (every expert int2, about 5.6 %): the smallest the plan alone can make the experts.
TOLERANCES = [0.005, 0.01, 0.02, 0.04, 0.08]
PRUNE = [0.125, 0.25, 0.5]
PRUNE_PER_LAYER = [0.25, 0.5]
MERGE = [6, 4]
# Compositions: the smaller model, then plans at the stored sizes of these plan-alone points.
COMPOSE = {
    "prune 12.5%": TOLERANCES,
    "prune 25%": [0.02, 0.04, 0.08],
    "prune 50%": [0.08],
    "merge 6": [0.04, 0.08],
    "merge 4": [0.08],
}
FEWER = 0.05  # "fewer bytes at equal perplexity": at least 5 % fewer, perplexity within two standard errors
STAGES = ["compress", "profile", "plan", "convert", "eval", "decode"]
BUDGET_SHARE = 0.40
THROTTLE = "90MB/s"
CTX = 256

COMMANDS: list[dict] = []  # every edgemoe command run (or skipped because its output existed)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def edgemoe(step: str, args: list[str], *, capture_json: bool = False, check: bool = True) -> dict | None:
    """Run `python -m edgemoe ARGS` from the repository root; returns its JSON output if asked."""
    cmd = [sys.executable, "-m", "edgemoe", *args]
    shown = shlex.join(["edgemoe", *args])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    COMMANDS.append({"step": step, "command": shown, "seconds": round(secs, 1), "rc": r.returncode})
    if r.returncode != 0:
        msg = f"{shown} failed (exit {r.returncode}):\n{r.stderr[-3000:]}"
        if check:
            raise RuntimeError(msg)
        log(msg)
        return None
    if capture_json:
        return json.loads(r.stdout)
    return {}


def skipped(step: str, args: list[str]) -> None:
    COMMANDS.append({"step": step, "command": shlex.join(["edgemoe", *args]), "seconds": None, "rc": "skipped"})


def tol_name(t: float) -> str:
    return f"{100 * t:g}%"


def slug(name: str) -> str:
    return (name.replace(" + ", "+").replace(" ", "-").replace("%", "pct").replace("@", "at").replace(",", "")
            .replace("/", "-"))


def source_fingerprint(*dirs: str) -> str:
    """Hash of the Python sources that decide what convert writes."""
    h = hashlib.sha256()
    for d in dirs:
        for f in sorted((ROOT / d).rglob("*.py")):
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


# --- the steps ----------------------------------------------------------------------------------


class Runner:
    def __init__(self, args):
        self.args = args
        self.redo = set(STAGES[STAGES.index(args.redo):]) if args.redo else set()
        self.calib = str(args.calib_tokens)

    def fresh(self, stage: str, out: Path, *inputs: Path) -> bool:
        """True if `out` exists, is newer than its inputs and the stage is not being redone."""
        if stage in self.redo or not out.exists():
            return False
        t = out.stat().st_mtime
        return all(not i.exists() or i.stat().st_mtime <= t for i in inputs)

    def compress(self, name: str, kind: str, value) -> Path:
        out = WORK / "models" / slug(name)
        if kind in ("prune", "prune per layer"):
            args = ["prune", rel(MODEL), rel(out), "--drop", f"{value:g}"] + (["--per-layer"] if kind != "prune" else [])
        else:
            args = ["merge", rel(MODEL), rel(out), "--experts-per-layer", str(value)]
        args += ["--calib-tokens", self.calib, "--json"]
        report = out.with_name(out.name + ".report.json")
        if self.fresh("compress", report) and out.is_dir():
            skipped("compress", args)
            return out
        log(f"{kind}: {name}")
        tmp = out.with_name(out.name + ".tmp")
        for p in (out, tmp):
            if p.exists():
                shutil.rmtree(p)
        r = edgemoe("compress", [a if a != rel(out) else rel(tmp) for a in args], capture_json=True)
        tmp.rename(out)
        report.write_text(json.dumps(r, indent=1) + "\n")
        return out

    def profile(self, name: str, model: Path) -> Path:
        out = WORK / "profiles" / f"{slug(name)}.json"
        args = ["profile", rel(model), "-o", rel(out), "--calib-tokens", self.calib, "--validate", "0",
                "--no-plot", "--quiet"]
        if self.fresh("profile", out, model / "config.json"):
            skipped("profile", args)
            return out
        log(f"profile: {name}")
        out.parent.mkdir(parents=True, exist_ok=True)
        edgemoe("profile", args)
        return out

    def plan(self, name: str, profile: Path, objective: list[str]) -> Path:
        out = WORK / "plans" / f"{slug(name)}.json"
        args = ["plan", rel(profile), *objective, "-o", rel(out), "--max-evals", str(self.args.max_evals),
                "--no-plot", "--quiet"]
        if self.fresh("plan", out, profile):
            skipped("plan", args)
            return out
        log(f"plan: {name}")
        out.parent.mkdir(parents=True, exist_ok=True)
        edgemoe("plan", args)
        return out

    def convert(self, name: str, model: Path, extra: list[str], inputs: list[Path]) -> Path:
        out = WORK / "conv" / slug(name)
        args = ["convert", rel(model), rel(out), *extra, "--force", "--quiet", "--json"]
        stamp = out / ".bench-stamp"
        want = source_fingerprint("edgemoe/store", "edgemoe/quant") + " " + shlex.join(args)
        if (self.fresh("convert", stamp, *inputs, *(i / "config.json" for i in [model]))
                and stamp.read_text() == want):
            skipped("convert", args)
            return out
        log(f"convert: {name}")
        out.parent.mkdir(parents=True, exist_ok=True)
        edgemoe("convert", args, capture_json=True)
        stamp.write_text(want)
        return out


def manifest_facts(conv: Path) -> dict:
    """Expert bytes as stored: distinct blobs of the manifest, edgemoe info's view, and the
    bytes if blobs with equal contents were stored once."""
    from edgemoe.cli.info import model_info

    m = json.loads((conv / "manifest.json").read_text())
    experts = m["experts"]
    align = m.get("alignment", 4096)
    pad = lambda n: -(-n // align) * align  # noqa: E731  (a blob as read and cached: padded to the alignment)
    by_offset = {(e["offset"], pad(e["size"])) for e in experts}
    by_content = {(e["format"], pad(e["size"]), e["crc32"]) for e in experts}
    counts: dict[str, int] = {}
    for e in experts:
        counts[e["format"]] = counts.get(e["format"], 0) + 1
    bits = {f: v.get("bits") for f, v in m["formats"].items()}
    info = model_info(str(conv), ctx_size=CTX)
    stored = sum(s for _, s in by_offset)
    store_file = (conv / "experts.bin").stat().st_size if (conv / "experts.bin").exists() else None
    layers = sorted({e["layer"] for e in experts})
    ids_per_layer = len(experts) // len(layers)
    return {
        "expert_bytes": stored,
        "info_expert_bytes": info["expert_bytes"],
        "info_expert_cache_bytes": info["expert_cache_bytes"],
        "experts_bin_bytes": store_file,
        "if_shared_bytes": sum(s for _, s, _ in by_content),
        "blobs": len(by_offset),
        "distinct_contents": len(by_content),
        "expert_ids_per_layer": ids_per_layer,
        "resident_bytes": info["resident_bytes"],
        "formats": counts,
        "bits_per_weight": sum(bits[e["format"]] for e in experts) / len(experts),
        "min_budget_bytes": info["memory"]["min_budget_bytes"],
        "min_cache_bytes": info["min_cache_bytes"],
        # what decides perplexity (contents) and what decides reads (layout)
        "content_key": hashlib.sha256(json.dumps(
            [sorted((e["layer"], e["expert"], e["format"], e["crc32"]) for e in experts),
             m["resident"]], sort_keys=True).encode()).hexdigest()[:16],
        "layout_key": hashlib.sha256(json.dumps([experts, m["resident"]], sort_keys=True).encode())
        .hexdigest()[:16],
    }


# --- evaluation -----------------------------------------------------------------------------------


def evaluate(conv: Path, key: str, runner: Runner) -> dict:
    """Held-out perplexity as `edgemoe eval CONV --mode io-free` (float32), per window; cached on
    the experts' and resident weights' contents."""
    cache = WORK / "eval" / f"{conv.name}.json"
    if "eval" not in runner.redo and cache.exists():
        r = json.loads(cache.read_text())
        if r.get("content_key") == key:
            return r
    import torch

    import edgemoe
    from edgemoe import assets
    from edgemoe.evaluate import eval_tokens, perplexity, read_text

    log(f"eval: {conv.name}")
    engine = edgemoe.load(conv, dtype="float32", mode="io-free", threads=torch.get_num_threads())
    try:
        context = engine.model.args.max_position_embeddings
        ids = eval_tokens(engine.tokenizer, read_text(assets.HELDOUT_TEXT), context, None)
        t0 = time.perf_counter()
        r = perplexity(engine.model, ids, context, per_window=True)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        r["context"] = context
    finally:
        engine.close()
    r["content_key"] = key
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(r) + "\n")
    return r


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean per-window NLL difference b - a and its standard error."""
    d = [y - x for x, y in zip(a, b)]
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))


# --- decode speed -----------------------------------------------------------------------------------


def decode_all(rows: list[dict], budget: int, runner: Runner) -> dict:
    """Decode tok/s of every configuration at one budget: rounds of one run each, alternating
    the order; cached on the layout of every store (any change reruns them all)."""
    args = runner.args
    prompt = WORK / "decode_prompt.txt"
    if not prompt.exists():
        from edgemoe import assets

        text = assets.HELDOUT_TEXT.read_text(encoding="utf-8")
        start = text.index("\n", len(text) // 3) + 1
        prompt.write_text(text[start:start + args.prompt_chars], encoding="utf-8")
    settings = {"budget": budget, "throttle": THROTTLE, "ctx": CTX, "tokens": args.decode_tokens,
                "rounds": args.rounds, "prompt_chars": args.prompt_chars,
                "layouts": {r["name"]: r["layout_key"] for r in rows}}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache = WORK / "decode.json"
    state = {"key": key, "settings": settings, "runs": []}
    if "decode" not in runner.redo and cache.exists():
        old = json.loads(cache.read_text())
        if old.get("key") == key:
            state = old
    state["runs"] = [x for x in state["runs"] if x["ok"]]  # failed runs are retried
    done = {(x["name"], x["round"]) for x in state["runs"]}
    names = [r["name"] for r in rows]
    conv = {r["name"]: r["conv"] for r in rows}
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        order = order[rnd // 2 % len(order):] + order[: rnd // 2 % len(order)]
        for name in order:
            if (name, rnd) in done:
                continue
            a = ["generate", conv[name], "--memory", str(budget), "--ctx-size", str(CTX), "--read-throttle",
                 THROTTLE, "--threads", "1", "--json", "-n", str(args.decode_tokens), "--ignore-eos",
                 "--prompt-file", rel(prompt)]
            log(f"decode round {rnd + 1}/{args.rounds}: {name}")
            out = edgemoe("decode", a, capture_json=True, check=False)
            s = (out or {}).get("stats", {})
            state["runs"].append({"name": name, "round": rnd, "ok": out is not None,
                                  **{k: s.get(k) for k in ("decode_tps", "decode_hit_rate",
                                                           "decode_bytes_read_per_token", "decode_stall_s_per_token",
                                                           "generated_tokens", "prompt_tokens", "cache_bytes",
                                                           "budget_bytes", "hit_rate")}})
            cache.write_text(json.dumps(state, indent=1) + "\n")
    out = {}
    for name in names:
        runs = [x for x in state["runs"] if x["name"] == name and x["ok"]]
        if not runs:
            out[name] = None
            continue
        med = lambda k: statistics.median(x[k] for x in runs)  # noqa: E731
        out[name] = {"tps": med("decode_tps"), "tps_runs": [x["decode_tps"] for x in runs],
                     "hit_rate": med("decode_hit_rate"), "bytes_per_token": med("decode_bytes_read_per_token"),
                     "stall_s_per_token": med("decode_stall_s_per_token"), "cache_bytes": runs[0]["cache_bytes"],
                     "prompt_tokens": runs[0]["prompt_tokens"], "generated_tokens": runs[0]["generated_tokens"]}
    return out


# --- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calib-tokens", type=int, default=8192,
                   help="calibration tokens for prune, merge and profile (default 8192)")
    p.add_argument("--max-evals", type=int, default=6, help="plan --max-evals (default 6)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the evaluations (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="decode runs per configuration (default 3; median)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per decode run (default 64)")
    p.add_argument("--prompt-chars", type=int, default=480, help="decode prompt: characters of held-out text")
    p.add_argument("--redo", choices=STAGES, default=None,
                   help="redo this stage and every later one even where outputs exist")
    p.add_argument("--no-decode", action="store_true", help="skip the decode measurements")
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "edgemoe_lab.experiments.compression", *(argv if argv is not None else sys.argv[1:])])
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    WORK.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    load_start = os.getloadavg()
    run = Runner(args)
    specs: list[dict] = []  # name, family, conv, plan path, base, ...

    # originals and uniform formats
    specs.append({"name": "bf16", "family": "original", "conv": run.convert("bf16", MODEL, [], [])})
    for f in UNIFORM:
        specs.append({"name": f"uniform {f}", "family": "uniform",
                      "conv": run.convert(f"uniform {f}", MODEL, ["--format", f], [])})
    # the plan alone
    base_profile = run.profile("base", MODEL)
    plan_alone: dict[float, Path] = {}
    for t in TOLERANCES:
        name = f"plan {tol_name(t)}"
        plan_alone[t] = run.plan(name, base_profile, ["--max-loss", tol_name(t)])
        specs.append({"name": name, "family": "plan", "plan": plan_alone[t], "tolerance": t,
                      "conv": run.convert(name, MODEL, ["--plan", rel(plan_alone[t])], [plan_alone[t]])})
    # pruned and merged models, then the compositions
    smaller: dict[str, Path] = {}
    for d in PRUNE:
        name = f"prune {100 * d:g}%"
        smaller[name] = run.compress(name, "prune", d)
        specs.append({"name": name, "family": "prune", "model": smaller[name],
                      "conv": run.convert(name, smaller[name], [], [])})
    for d in PRUNE_PER_LAYER:
        name = f"prune {100 * d:g}% per layer"
        smaller[name] = run.compress(name, "prune per layer", d)
        specs.append({"name": name, "family": "prune", "model": smaller[name],
                      "conv": run.convert(name, smaller[name], [], [])})
    for n in MERGE:
        name = f"merge {n}"
        smaller[name] = run.compress(name, "merge", n)
        specs.append({"name": name, "family": "merge", "model": smaller[name],
                      "conv": run.convert(name, smaller[name], [], [])})
    for base, tols in COMPOSE.items():
        prof = run.profile(base, smaller[base])
        for t in tols:
            size = json.loads(plan_alone[t].read_text())["meta"]["expert_bytes"]
            name = f"{base} + plan @ size of plan {tol_name(t)}"
            pl = run.plan(name, prof, ["--target-size", str(size)])
            specs.append({"name": name, "family": base.split()[0] + " + plan", "base": base, "plan": pl,
                          "matches": f"plan {tol_name(t)}", "target_bytes": size, "model": smaller[base],
                          "conv": run.convert(name, smaller[base], ["--plan", rel(pl)], [pl])})

    # bytes and perplexity
    rows = []
    for s in specs:
        facts = manifest_facts(s["conv"])
        if facts["info_expert_cache_bytes"] != facts["expert_bytes"]:
            log(f"note: {s['name']}: manifest distinct blobs {facts['expert_bytes']} B, edgemoe info "
                f"expert_cache_bytes {facts['info_expert_cache_bytes']} B")
        r = evaluate(s["conv"], facts["content_key"], run)
        row = {**{k: v for k, v in s.items() if k not in ("conv", "plan", "model")}, **facts,
               "conv": rel(s["conv"]), "ppl": r["ppl"], "nll": r["nll"], "tokens": r["tokens"],
               "context": r["context"], "window_nll": r["window_nll"], "eval_s": r["seconds"]}
        if "plan" in s:
            meta = json.loads(Path(s["plan"]).read_text())["meta"]
            row["plan"] = {k: meta.get(k) for k in ("objective", "expert_bytes", "predicted_loss", "measured_loss",
                                                   "counts", "seconds")}
            row["plan"]["path"] = rel(s["plan"])
            row["plan"]["calibration_ppl"] = meta.get("calibration", {}).get("reference_ppl")
        if "model" in s:
            rep = Path(str(s["model"]) + ".report.json")
            if rep.exists():
                row["compress_report"] = json.loads(rep.read_text())
        rows.append(row)
    ref = rows[0]
    for r in rows:
        r["loss"] = r["ppl"] / ref["ppl"] - 1
        r["vs_bf16"] = ref["expert_bytes"] / r["expert_bytes"]
        d, se = paired(ref["window_nll"], r["window_nll"]) if r is not ref else (0.0, 0.0)
        r["nll_vs_bf16"], r["se_vs_bf16"] = d, se
    groups_mixed = mixed_groups(rows)

    # decode speed at one budget
    bf = rows[0]
    budget = round(BUDGET_SHARE * bf["expert_bytes"]) + bf["min_budget_bytes"] - bf["min_cache_bytes"]
    decode = {} if args.no_decode else decode_all(rows, budget, run)
    for r in rows:
        r["decode"] = decode.get(r["name"])

    # the reading: compositions against the plan alone
    front = pareto(rows)
    for r in rows:
        r["pareto"] = r["name"] in front
    verdicts = dominance(rows)
    data = {
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(), "cpus": os.cpu_count(),
        "machine": platform.machine(), "threads": args.threads, "torch": torch.__version__,
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "model": rel(MODEL), "heldout_tokens": ref["tokens"], "context": ref["context"],
        "calib_tokens": args.calib_tokens, "tolerances": TOLERANCES, "compose": COMPOSE,
        "decode_settings": {"budget_bytes": budget, "share_of_bf16_experts": BUDGET_SHARE,
                            "runtime_besides_cache": bf["min_budget_bytes"] - bf["min_cache_bytes"],
                            "read_throttle": THROTTLE, "ctx_size": CTX, "tokens": args.decode_tokens,
                            "rounds": args.rounds, "prompt": rel(WORK / "decode_prompt.txt"),
                            "prompt_chars": args.prompt_chars, "threads": 1},
        "rows": [{k: v for k, v in r.items() if k != "window_nll"} for r in rows],
        "pareto_front": front, "dominance": verdicts, "merge_groups_mixed_formats": groups_mixed,
        "commands": COMMANDS, "seconds": round(time.time() - t_start),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, RESULTS / "compression.png")
    (RESULTS / "compression.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / "compression.md").write_text(markdown(data, rows))
    log(f"wrote {rel(RESULTS / 'compression.md')} in {data['seconds']} s")
    return 0


def mixed_groups(rows: list[dict]) -> dict:
    """For merge + plan rows: merged groups whose members the plan gave different formats (a
    store that shares a group's blob cannot share those)."""
    out = {}
    for r in rows:
        if r["family"] != "merge + plan":
            continue
        groups = r.get("compress_report", {}).get("groups", {})
        plan = json.loads((ROOT / r["plan"]["path"]).read_text())
        fmt = lambda layer, e: plan["experts"].get(f"{layer}.{e}", plan["default"])  # noqa: E731
        n = sum(1 for layer, gs in groups.items() for g in gs if len({fmt(layer, e) for e in g}) > 1)
        total = sum(1 for gs in groups.values() for g in gs if len(g) > 1)
        out[r["name"]] = {"mixed": n, "merged_groups": total, "plan_counted_bytes": r["plan"]["expert_bytes"],
                          "stored_bytes": r["expert_bytes"], "target_bytes": r.get("target_bytes")}
    return out


def pareto(rows: list[dict]) -> list[str]:
    """Names of the rows no other row dominates (fewer or equal bytes and lower or equal
    perplexity, one of them strictly)."""
    front = []
    for r in rows:
        if not any(o is not r and o["expert_bytes"] <= r["expert_bytes"] and o["ppl"] <= r["ppl"]
                   and (o["expert_bytes"] < r["expert_bytes"] or o["ppl"] < r["ppl"]) for o in rows):
            front.append(r["name"])
    return front


def dominance(rows: list[dict]) -> list[dict]:
    """Every (composition, plan-alone) pair where the composition has at most the plan's bytes,
    with the paired perplexity comparison."""
    plans = [r for r in rows if r["family"] == "plan"]
    out = []
    for c in rows:
        if "+ plan" not in c["family"]:
            continue
        for pl in plans:
            if c["expert_bytes"] > pl["expert_bytes"]:
                continue
            d, se = paired(pl["window_nll"], c["window_nll"])
            lower = c["ppl"] < pl["ppl"]
            significant = d < -2 * se
            worse = d > 2 * se
            fewer = c["expert_bytes"] <= (1 - FEWER) * pl["expert_bytes"]
            out.append({"composition": c["name"], "plan": pl["name"], "composition_bytes": c["expert_bytes"],
                        "plan_bytes": pl["expert_bytes"], "composition_ppl": c["ppl"], "plan_ppl": pl["ppl"],
                        "nll_difference": d, "se": se,
                        # lower perplexity at equal or fewer bytes, or fewer bytes at equal perplexity
                        "dominates": lower or (fewer and c["ppl"] <= pl["ppl"]),
                        "dominates_beyond_noise": significant or (fewer and not worse),
                        "verdict": ("lower ppl beyond 2 s.e." if significant else
                                    "lower ppl within noise" if lower else
                                    "higher ppl beyond 2 s.e." if worse else "higher ppl within noise")})
    return out


FAMILY_STYLE = {
    "original": ("black", "s"), "uniform": ("tab:gray", "o"), "plan": ("tab:blue", "D"),
    "prune": ("tab:orange", "v"), "merge": ("tab:green", "^"),
    "prune + plan": ("tab:red", "P"), "merge + plan": ("tab:purple", "X"),
}


def short(name: str) -> str:
    return (name.replace(" + plan @ size of plan ", " + plan@").replace("prune ", "prune").replace("uniform ", "")
            .replace("merge ", "merge"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6.2), dpi=110, gridspec_kw={"width_ratios": [1, 1.25]})
    plans = [r for r in rows if r["family"] == "plan"]
    zoom_x = (0.8 * min(r["expert_bytes"] for r in plans) / 1e6, 1.25 * max(r["expert_bytes"] for r in plans) / 1e6)
    zoom_y = (0.985 * rows[0]["ppl"], 1.1 * max(r["ppl"] for r in plans))
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["expert_bytes"])
    for ax, zoom in zip(axes, (False, True)):
        for fam, (colour, marker) in FAMILY_STYLE.items():
            rs = [r for r in rows if r["family"] == fam]
            if rs:
                ax.scatter([r["expert_bytes"] / 1e6 for r in rs], [r["ppl"] for r in rs], c=colour, marker=marker,
                           s=46, label=fam, zorder=3)
        shared = [r for r in rows if r["if_shared_bytes"] < r["expert_bytes"]]
        if shared:
            ax.scatter([r["if_shared_bytes"] / 1e6 for r in shared], [r["ppl"] for r in shared], facecolors="none",
                       edgecolors=[FAMILY_STYLE[r["family"]][0] for r in shared], marker="o", s=60, zorder=2,
                       label="if equal blobs were stored once")
        xs = [r["expert_bytes"] / 1e6 for r in front]
        ax.step(xs + [xs[-1] * 1.5], [r["ppl"] for r in front] + [front[-1]["ppl"]], where="post", color="k",
                lw=1, ls="--", zorder=1, label="Pareto front")
        ax.scatter(xs, [r["ppl"] for r in front], facecolors="none", edgecolors="k", s=150, lw=1.2, zorder=4)
        for r in rows:
            x, y = r["expert_bytes"] / 1e6, r["ppl"]
            inside = zoom_x[0] <= x <= zoom_x[1] and zoom_y[0] <= y <= zoom_y[1]
            if zoom != inside:
                continue
            ax.annotate(short(r["name"]), (x, y), textcoords="offset points", xytext=(5, 3 if zoom else 2),
                        fontsize=6.5, color="0.2")
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("expert bytes as stored (MB, log scale)")
        if zoom:
            ax.set_xlim(*zoom_x)
            ax.set_ylim(*zoom_y)
            ax.set_title("zoom: the plan alone's range", fontsize=10)
        else:
            ax.set_yscale("log")
            ax.set_ylabel("held-out perplexity")
            ax.set_title("all configurations (log-log)", fontsize=10)
            ax.legend(fontsize=7.5, loc="upper right")
            ax.add_patch(plt.Rectangle((zoom_x[0], zoom_y[0]), zoom_x[1] - zoom_x[0], zoom_y[1] - zoom_y[0],
                                       fill=False, ec="0.5", lw=0.8, ls=":"))
    fig.suptitle("Bundled tiny MoE: held-out perplexity vs stored expert bytes (Pareto front circled)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- markdown -----------------------------------------------------------------------------------------


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:+.{digits}f}%"


def markdown(d: dict, rows: list[dict]) -> str:
    out: list[str] = []
    w = out.append
    ref = rows[0]
    ds = d["decode_settings"]
    w("# Compression: pruning, merging and bitwidth plans on one quality vs bytes curve")
    w("")
    w("<!-- Generated by python -m edgemoe_lab.experiments.compression; do not edit by hand. -->")
    w("")
    w(f"Command: `{d['command']}` ({d['date']}; CPU: {d['cpu']}, {d['cpus']} cores, shared with other jobs: load "
      f"average {d['loadavg_start'][0]:.1f} at the start, {d['loadavg_end'][0]:.1f} at the end; torch {d['torch']}, "
      f"{d['threads']} thread; {d['seconds'] / 60:.1f} min in all; "
      f"{sum(1 for c in d['commands'] if c['rc'] == 'skipped')} of {len(d['commands'])} commands skipped because "
      "their outputs existed, see Commands).")
    w("")
    w(f"Model: the bundled tiny MoE (`{d['model']}`, 8 layers x 8 experts, top-2, bf16). **Held-out ppl**: "
      f"`edgemoe eval OUT --mode io-free` on `edgemoe/assets/heldout.txt` ({d['heldout_tokens']:,} predicted tokens, "
      f"windows of {d['context']}, float32). **Loss**: relative perplexity increase over bf16; **±** two standard "
      "errors from the per-window NLL differences with bf16 on the same windows. **Expert bytes**: what `edgemoe "
      "convert` wrote, each distinct blob of the manifest once (4 KiB-padded, as a cache slot holds it; a merged "
      "group's members share one blob). **Calib. loss**: what `edgemoe plan` measured on calibration text, for a "
      "composition relative to its pruned or merged base. Calibration for prune, merge and profile: "
      f"`edgemoe/assets/calib.txt`, {d['calib_tokens']:,} tokens (`--calib-tokens`); plans search with the "
      "profile's tokens.")
    w("")
    w(f"**Decode** (same run for all rows, {ds['rounds']} rounds alternating the order, median): `edgemoe generate "
      f"OUT --memory {ds['budget_bytes']} --ctx-size {ds['ctx_size']} --read-throttle {ds['read_throttle']} "
      f"--threads 1 --json -n {ds['tokens']} --ignore-eos --prompt-file {ds['prompt']}` (greedy). The budget is "
      f"{ds['share_of_bf16_experts']:.0%} of the bf16 experts ({mb(ds['share_of_bf16_experts'] * ref['expert_bytes'])})"
      f" plus what the runtime needs besides the expert cache ({mb(ds['runtime_besides_cache'])}: resident weights, "
      "KV cache for 256 tokens, workspace; `min_budget_bytes - min_cache_bytes` of the bf16 conversion). Hit rate and "
      "bytes read per token are the decode steps' (`decode_hit_rate`, `decode_bytes_read_per_token`). tok/s is noisy "
      "on this shared machine; compare rows through the x bf16 column (same run).")
    w("")
    show_shared = any(r["if_shared_bytes"] < r["expert_bytes"] for r in rows)
    w("| configuration | experts/layer | expert bytes | vs bf16 | " + ("if shared | " if show_shared else "")
      + "bits/weight | held-out ppl | loss | ± | calib. loss | decode tok/s | x bf16 | hit rate | read/token | formats |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if show_shared else ""))
    bf_tps = (ref.get("decode") or {}).get("tps")
    for r in rows:
        dec = r.get("decode") or {}
        name = r["name"] + (" **(front)**" if r["pareto"] else "")
        distinct = r["compress_report"]["experts_per_layer"].get("distinct_after") if r.get("compress_report") else None
        epl = f"{r['expert_ids_per_layer']}" + (f" ({distinct} distinct)" if distinct else "")
        after = r["compress_report"]["experts_per_layer"].get("after") if r.get("compress_report") else None
        if isinstance(after, dict):  # prune --per-layer: each layer's own count (the rest is padding)
            epl = f"{min(after.values())}-{max(after.values())} by layer"
        calib = "-"
        if r.get("plan") and r["plan"].get("measured_loss") is not None:
            calib = pct(r["plan"]["measured_loss"])
            if "+ plan" in r["family"]:
                calib += " of its base"
        shared = mb(r["if_shared_bytes"]) if r["if_shared_bytes"] < r["expert_bytes"] else "="
        fm = ", ".join(f"{f} {n}" for f, n in sorted(r["formats"].items(), key=lambda kv: -kv[1]))
        tps = f"{dec['tps']:.1f}" if dec else "-"
        ratio = f"{dec['tps'] / bf_tps:.2f}x" if dec and bf_tps else "-"
        hit = f"{dec['hit_rate']:.1%}" if dec else "-"
        rd = f"{dec['bytes_per_token'] / 1e3:.0f} kB" if dec else "-"
        unc = f"{200 * r['se_vs_bf16']:.2f}%" if r is not ref else "-"
        w(f"| {name} | {epl} | {mb(r['expert_bytes'])} | {r['vs_bf16']:.2f}x | " + (f"{shared} | " if show_shared else "")
          + f"{r['bits_per_weight']:.2f} | "
          f"{r['ppl']:.3f} | {pct(r['loss'])} | {unc} | {calib} | {tps} | {ratio} | {hit} | {rd} | {fm} |")
    w("")
    w("![Pareto plot](compression.png)")
    w("")
    w("Pareto front (no other row has fewer or equal bytes and lower or equal perplexity): "
      + ", ".join(d["pareto_front"]) + ".")
    w("")
    by_name = {r["name"]: r for r in rows}
    pairs = [(r, by_name.get(r["name"].replace(" per layer", ""))) for r in rows if r["name"].endswith(" per layer")]
    if pairs:
        w("**Per-layer budgets** (`prune --per-layer`: experts ranked over all layers, so that layers keep "
          "different numbers) against the same share removed from every layer, at the same expert bytes: "
          + "; ".join(f"{r['name']} {pct(r['loss'])} (± {200 * r['se_vs_bf16']:.2f}%) vs {u['name']} {pct(u['loss'])} "
                      f"(± {200 * u['se_vs_bf16']:.2f}%), {mb(r['expert_bytes'])} vs {mb(u['expert_bytes'])}"
                      for r, u in pairs if u) + ".")
        w("")
    w("## Does pruning or merging with the plan dominate the plan alone?")
    w("")
    w("Each composition (prune/merge -> `profile` -> `plan --target-size S` -> `convert --plan`) is planned to the "
      "stored size S of a plan-alone point, so it has at most that point's bytes. Paired on the same held-out "
      "windows (composition minus plan alone, mean NLL, two standard errors); each composition against the plan "
      "point whose size it was given, and any other pair where it dominates (every pair: `dominance` in the JSON). "
      f"A composition dominates a plan point with lower perplexity at equal or fewer bytes, or with at least "
      f"{FEWER:.0%} fewer bytes at a perplexity within two standard errors.")
    w("")
    w("| composition | bytes | ppl | plan alone | bytes | ppl | NLL difference | verdict |")
    w("|---|---|---|---|---|---|---|---|")
    by = {r["name"]: r for r in rows}
    for v in d["dominance"]:
        if not (v["dominates"] or by[v["composition"]].get("matches") == v["plan"]):
            continue
        w(f"| {v['composition']} | {mb(v['composition_bytes'])} | {v['composition_ppl']:.3f} | {v['plan']} | "
          f"{mb(v['plan_bytes'])} | {v['plan_ppl']:.3f} | {v['nll_difference']:+.5f} ± {2 * v['se']:.5f} | "
          f"{v['verdict']} |")
    w("")
    w(reading(d, rows))
    w("")
    w(decode_reading(rows))
    w("")
    if d["merge_groups_mixed_formats"]:
        g = d["merge_groups_mixed_formats"]
        merged_base = min((r["loss"] for r in rows if r["family"] == "merge"), default=None)
        worst_plan = max(r["loss"] for r in rows if r["family"] == "plan")
        mixed = sum(v["mixed"] for v in g.values())
        same = all(v["plan_counted_bytes"] == v["stored_bytes"] for v in g.values())
        w("**Merge + plan and sharing.** `edgemoe plan` treats a merged group (experts the profile finds identical) as "
          "one unit: one format for all its members, its blob counted once. Planned and stored bytes "
          + ("agree" if same else "differ") + " (" + "; ".join(
              f"{k}: planned {mb(v['plan_counted_bytes'])}, stored {mb(v['stored_bytes'])}" for k, v in g.items())
          + f"), and {mixed} merged group{'' if mixed == 1 else 's'} got members in different formats ("
          + "; ".join(f"{k}: {v['mixed']} of {v['merged_groups']}" for k, v in g.items()) + "). "
          + (f"Merging still does not pay here: the best merged model is already {pct(merged_base, 1)} at bf16, "
             f"above every plan-alone point (at most {pct(worst_plan, 1)})."
             if merged_base is not None and merged_base > worst_plan else ""))
        w("")
    w("## Commands")
    w("")
    w("Every edgemoe command of this run, in order (`skipped`: its output existed and was reused):")
    w("")
    w("```")
    for c in d["commands"]:
        if c["step"] == "decode":
            continue
        t = "skipped" if c["rc"] == "skipped" else f"{c['seconds']} s"
        w(f"{c['command']}    # {t}")
    w("```")
    w("")
    w(f"Decode runs: {sum(1 for c in d['commands'] if c['step'] == 'decode')} `edgemoe generate` commands as above "
      "(listed in the JSON).")
    return "\n".join(out) + "\n"


def reading(d: dict, rows: list[dict]) -> str:
    by = {r["name"]: r for r in rows}
    plans = sorted((r for r in rows if r["family"] == "plan"), key=lambda r: r["expert_bytes"])
    floor = plans[0]
    at_floor = len(floor["formats"]) == 1
    wins = [v for v in d["dominance"] if v["dominates"]]
    out = ["**Reading.**"]
    if wins:
        sure = [v for v in wins if v["dominates_beyond_noise"]]
        parts = []
        for v in wins:
            c, p = by[v["composition"]], by[v["plan"]]
            parts.append(f"{v['composition']} ({mb(c['expert_bytes'])}, ppl {c['ppl']:.2f}, {pct(c['loss'])}) vs "
                         f"{v['plan']} ({mb(p['expert_bytes'])}, ppl {p['ppl']:.2f}, {pct(p['loss'])}): NLL "
                         f"{v['nll_difference']:+.4f} ± {2 * v['se']:.4f}, {v['verdict']}")
        out.append(f"Goal met in {len(wins)} pair(s) ({len(sure)} beyond two standard errors): "
                   + "; ".join(parts).rstrip(".") + ".")
        if at_floor and all(v["plan"] == floor["name"] for v in wins):
            out.append(f"Only against the plan at its floor: {floor['name']} is every expert in "
                       f"{next(iter(floor['formats']))}, the fewest bytes the plan alone can reach (any larger "
                       "tolerance gives the same). There the bytes pruning saves buy the remaining experts more bits.")
        for v in wins:
            bigger = [p for p in plans if p["expert_bytes"] > v["composition_bytes"]]
            if bigger:
                nxt, c = bigger[0], by[v["composition"]]
                dd, se = paired(c["window_nll"], nxt["window_nll"])
                out.append(f"But the next plan point, {nxt['name']}, is only "
                           f"{nxt['expert_bytes'] / c['expert_bytes'] - 1:.1%} larger ({mb(nxt['expert_bytes'])}) "
                           f"and much better ({pct(nxt['loss'])} against {pct(c['loss'])}; NLL {dd:+.4f} ± "
                           f"{2 * se:.4f}): the plan alone's curve is steep at its floor, so this domination is "
                           "real but of little practical use.")
                break
    else:
        out.append("Goal not met: no pruned or merged configuration with the plan has lower perplexity than the "
                   "plan alone at equal or fewer bytes, nor fewer bytes at equal perplexity.")
    inside = [p for p in plans if not (at_floor and p is floor)]
    margins = []
    for p in inside:
        cands = [v for v in d["dominance"] if v["plan"] == p["name"]]
        if cands:
            best = min(cands, key=lambda v: v["nll_difference"])
            margins.append((p, best))
    if margins:
        worse = [m for m in margins if m[1]["nll_difference"] > 0]
        out.append(f"Inside the plan's range ({', '.join(p['name'] for p in inside)}), the best composition at equal "
                   f"or fewer bytes is worse than the plan alone at {len(worse)} of {len(margins)} points, by "
                   + ", ".join(f"{100 * b['nll_difference']:+.1f}% NLL at {p['name']}" for p, b in margins) + ".")
    lost = {r["name"]: r["loss"] for r in rows if r["family"] in ("prune", "merge")}
    out.append("Why: pruning and merging cost perplexity before any bit is removed ("
               + ", ".join(f"{k} {pct(v, 1)}" for k, v in lost.items()) + " at bf16), more than the plan alone "
               f"loses at {mb(inside[0]['expert_bytes'] if inside else floor['expert_bytes'])} "
               f"({pct(inside[0]['loss'] if inside else floor['loss'], 1)}): on this model removing an expert "
               "costs more than taking bits from all of them, until the plan runs out of bits to take.")
    below = sorted((r for r in rows if "+ plan" in r["family"] and r["expert_bytes"] < floor["expert_bytes"]),
                   key=lambda r: r["expert_bytes"])
    if below:
        out.append(f"Below the plan's floor ({mb(floor['expert_bytes'])}) only compositions exist: "
                   + ", ".join(f"{r['name']} {mb(r['expert_bytes'])} at {pct(r['loss'], 1)}" for r in below)
                   + ". They extend the front to fewer bytes, at a large perplexity cost.")
    return " ".join(out)


def decode_reading(rows: list[dict]) -> str:
    dec = [r for r in rows if r.get("decode")]
    if not dec:
        return "Decode speed was not measured (`--no-decode`)."
    cache = dec[0]["decode"]["cache_bytes"]
    fits = [r for r in dec if r["decode"]["hit_rate"] >= 0.999]
    io = sorted((r for r in dec if r["decode"]["hit_rate"] < 0.999), key=lambda r: -r["decode"]["bytes_per_token"])
    ref = rows[0]["decode"]["tps"] if rows[0].get("decode") else None
    out = [f"**Decode.** The expert cache gets {mb(cache)} of the budget."]
    if fits:
        t = [r["decode"]["tps"] for r in fits]
        out.append(f"{len(fits)} configurations fit in it (all with experts up to "
                   f"{mb(max(r['expert_bytes'] for r in fits))}): after the prompt every decode step hits and reads "
                   f"nothing, so their speed is compute alone, {min(t):.0f}-{max(t):.0f} tok/s "
                   f"({min(t) / ref:.1f}-{max(t) / ref:.1f}x bf16); the spread between them is mostly this shared "
                   "machine's noise, not a property of the configuration.")
    if io:
        out.append("The rest read experts at 90 MB/s: " + ", ".join(
            f"{r['name']} {r['decode']['tps']:.0f} tok/s ({r['decode']['hit_rate']:.0%} hits, "
            f"{r['decode']['bytes_per_token'] / 1e3:.0f} kB/token)" for r in io) +
            ". Pruning and merging speed decoding up through the bytes they take off a model that does not fit "
            "(merged groups are read and cached once); once the experts fit, they add nothing.")
    return " ".join(out)


if __name__ == "__main__":
    sys.exit(main())
