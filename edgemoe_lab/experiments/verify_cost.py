"""What `--verify always` costs next to the default `--verify first`.

    python -m edgemoe_lab.experiments.verify_cost [--repeats 3] [--tokens 32] [--budget-frac 0.3] [--wait-quiet 120]

`first` checks an expert's crc32 the first time this process reads it; re-reads after an
eviction are not checked, so bytes that change on disk after that are used unchecked.
`always` checks every read from storage. The difference therefore shows only when experts
are re-read, i.e. under a memory budget below the experts' size. Two models, each at a
budget of the minimum that runs (resident weights, KV cache of a 256-token context, workspace,
one layer's top-k experts) plus --budget-frac of the expert bytes:

    bundled   the bundled trained tiny model (edgemoe/assets/tiny-moe), converted as is
    mixtral   a random-weight Mixtral-shaped bf16 checkpoint (edgemoe_lab.checkpoints),
              8 layers x 8 experts of 17.3 MB (1.1 GB of experts)

Every run is a fresh process (`--child`: edgemoe.load + generate, greedy, EOS ignored)
after dropping the page cache; the engine's defaults otherwise (O_DIRECT reads, EdgeMoE
cache policy, gate look-ahead preloading). The two settings alternate within each repeat
and the order rotates between repeats; medians over repeats are reported, and the
always/first ratios are taken within each repeat. A microbenchmark of the checksum
(zlib.crc32 on one expert's bytes) and the disk's O_DIRECT read bandwidth are recorded
next to the results. Writes edgemoe_lab/results/verify_cost.md; working files go to
edgemoe_lab/work/verify_cost/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgemoe_lab import paths  # noqa: E402

WORK = paths.WORK / "verify_cost"
RESULTS = paths.RESULTS
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"
# (label, --verify, crc32 implementation). "always, isal" runs where the optional isal
# package is importable (ISA-L's crc32: the same checksum values as zlib's).
SETTINGS = [("first", "first", "zlib"), ("always", "always", "zlib"), ("always, isal", "always", "isal")]
CTX = 256  # context size (its KV cache is part of the budget)


def child(opts) -> None:
    """One measured run: load, generate, print the statistics as one JSON line."""
    import edgemoe
    from edgemoe.store import reader

    reader.crc32 = _crc(opts.crc)
    t0 = time.perf_counter()
    engine = edgemoe.load(opts.child, memory=int(opts.memory), verify=opts.verify, ctx_size=CTX)
    load_s = time.perf_counter() - t0
    with engine:
        r = engine.generate(PROMPT, max_tokens=opts.tokens, ignore_eos=True)
        cache = engine.provider.cache.stats()
    print(json.dumps({"stats": r.stats.to_dict(), "load_s": load_s, "info": engine.info, "token_ids": r.token_ids,
                      "verifications": cache["verifications"], "verify_bytes": cache["verify_bytes"]}))


def _crc(name: str):
    if name == "zlib":
        import zlib

        return zlib.crc32
    from isal.isal_zlib import crc32

    return crc32


def paired_child(opts) -> None:
    """Paired decode measurement in one process: the settings take turns, one generate
    call each per round, on one engine (the cache's `verify` and the store's crc32 are
    switched between calls), so slow changes in the machine's load hit all of them alike.
    After a warm-up call every expert has had its first check, so `first` checks nothing
    more: its rounds are the decode time without checksums."""
    import edgemoe
    from edgemoe.store import reader

    settings = json.loads(opts.settings)
    engine = edgemoe.load(opts.paired, memory=int(opts.memory), verify="always", ctx_size=CTX)
    cache = engine.provider.cache
    out = {label: [] for label, _, _ in settings}
    with engine:
        for _ in range(2):  # warm-up: first reads and checks of (nearly) every expert
            engine.generate(PROMPT, max_tokens=opts.tokens, ignore_eos=True)
        prompts = [PROMPT + f"\n# round {i}\n" for i in range(opts.rounds)]
        for i, prompt in enumerate(prompts):
            k = i % len(settings)
            for label, verify, crc in settings[k:] + settings[:k]:
                cache.verify, reader.crc32 = verify, _crc(crc)
                cache._verified = set(cache._store.entries)  # "first": every expert already checked once
                r = engine.generate(prompt, max_tokens=opts.tokens, ignore_eos=True)
                c = cache.stats()
                st = r.stats.to_dict()
                out[label].append({"round": i, "decode_tps": st["decode_tps"], "decode_s": st["decode_s"],
                                   "prefill_s": st["prefill_s"], "read_s": st["read_s"], "verify_s": st["verify_s"],
                                   "verifications": c["verifications"], "bytes_read": st["bytes_read"],
                                   "hit_rate": st["hit_rate"], "stall_s": st["stall_s"], "token_ids": r.token_ids})
    print(json.dumps(out))


def paired(model: Path, memory: int, settings: list, tokens: int, rounds: int) -> dict:
    cmd = [sys.executable, "-m", __spec__.name, "--paired", str(model), "--memory", str(memory), "--tokens", str(tokens),
           "--rounds", str(rounds), "--settings", json.dumps(settings)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(model: Path, memory: int, verify: str, crc: str, tokens: int) -> dict:
    from edgemoe_lab.peer.machine import drop_caches

    cmd = [sys.executable, "-m", __spec__.name, "--child", str(model), "--memory", str(memory), "--verify", verify,
           "--crc", crc, "--tokens", str(tokens)]
    dropped = drop_caches()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["page_cache_dropped"] = dropped
    return out


def prepare(log) -> dict[str, Path]:
    from edgemoe import assets
    from edgemoe_lab.checkpoints import MixtralSpec, write_random_mixtral
    from edgemoe.store.convert import convert

    WORK.mkdir(parents=True, exist_ok=True)
    spec = MixtralSpec(layers=8, experts=8, top_k=2, hidden=1024, inter=2816, heads=16, kv_heads=4, head_dim=64)
    hf = WORK / "mixtral-hf"
    if not (hf / "bench_model.json").exists():
        log("writing the random Mixtral checkpoint")
    write_random_mixtral(hf, spec)
    models = {"bundled": (Path(assets.MODEL_DIR), WORK / "bundled"), "mixtral": (hf, WORK / "mixtral")}
    out = {}
    for name, (src, dst) in models.items():
        if not (dst / "manifest.json").exists():
            log(f"converting {name}")
            convert(src, dst, force=True)
        out[name] = dst
    return out


def budget_for(model: Path, frac: float) -> tuple[int, dict]:
    """The smallest budget that runs (resident weights, KV cache for CTX tokens, workspace,
    one layer's top-k experts) plus `frac` of the expert bytes for the cache."""
    import edgemoe

    with edgemoe.load(model, ctx_size=CTX) as engine:
        info = engine.info
    memory = info["min_budget_bytes"] + int(frac * info["expert_bytes"])
    with edgemoe.load(model, memory=memory, ctx_size=CTX) as engine:
        return memory, engine.info


def crc_microbench(expert_bytes: int, repeats: int = 20) -> dict:
    """zlib.crc32 throughput on one expert's worth of (random) bytes, as the verify path
    calls it; isal's crc32 (same polynomial, same values) where that package is installed."""
    import zlib

    buf = memoryview(os.urandom(expert_bytes))
    impls = {"zlib.crc32": zlib.crc32}
    try:
        from isal import isal_zlib  # optional: ISA-L's carry-less-multiply crc32

        assert isal_zlib.crc32(buf) == zlib.crc32(buf)
        impls["isal_zlib.crc32"] = isal_zlib.crc32
    except ImportError:
        pass
    out = {}
    for name, fn in impls.items():
        fn(buf)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(buf)
            times.append(time.perf_counter() - t0)
        out[name] = {"bytes": expert_bytes, "median_s": statistics.median(times),
                     "gb_per_s": round(expert_bytes / statistics.median(times) / 1e9, 2)}
    return out


def machine() -> dict:
    from edgemoe_lab.peer.machine import cpu_flags, cpu_model

    flags = cpu_flags()
    keep = ("sse4_2", "pclmulqdq", "vpclmulqdq", "avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "sha_ni")
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "flags": [f for f in keep if f in flags],
            "flags_absent": [f for f in keep if f not in flags], "platform": platform.platform(),
            "python": platform.python_version()}


def isal_info() -> dict | None:
    try:
        import isal
    except ImportError:
        return None
    from importlib.metadata import version

    return {"version": version("isal"), "path": str(Path(isal.__file__).parent.parent)}


def has_isal() -> bool:
    try:
        import isal.isal_zlib  # noqa: F401
    except ImportError:
        return False
    return True


def ratio_median(pairs: list[tuple[float, float]]) -> float:
    return statistics.median(a / b for a, b in pairs if b) if pairs else 0.0


def summarize(runs: dict[str, list[dict]]) -> dict:
    s = {}
    for mode, rs in runs.items():
        med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
        st = lambda r: r["stats"]  # noqa: E731
        s[mode] = {
            "decode_tps": med(lambda r: st(r)["decode_tps"]),
            "prefill_s": med(lambda r: st(r)["prefill_s"]),
            "decode_s": med(lambda r: st(r)["decode_s"]),
            # Within each run: robust to other load on the machine, which swings tok/s.
            "verify_share": med(lambda r: st(r)["verify_s"] / (st(r)["prefill_s"] + st(r)["decode_s"])),
            "read_s": med(lambda r: st(r)["read_s"]),
            "verify_s": med(lambda r: st(r)["verify_s"]),
            "verifications": med(lambda r: r["verifications"]),
            "verify_bytes": med(lambda r: r["verify_bytes"]),
            "bytes_read": med(lambda r: st(r)["bytes_read"]),
            "hit_rate": med(lambda r: st(r)["hit_rate"]),
            "stall_s": med(lambda r: st(r)["stall_s"]),
            "peak_rss_bytes": med(lambda r: st(r)["peak_rss_bytes"]),
            "io": rs[0]["stats"]["io"],
        }
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--budget-frac", type=float, default=0.3)
    ap.add_argument("--wait-quiet", type=float, default=120, help="seconds to wait for idle CPUs before each repeat")
    ap.add_argument("--models", default="bundled,mixtral")
    ap.add_argument("--rewrite", action="store_true", help="only write the .md again from the last run's report.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--verify", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--crc", default="zlib", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=8, help="rounds of the paired in-process comparison")
    ap.add_argument("--paired", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        return child(opts)
    if opts.paired:
        return paired_child(opts)
    if opts.rewrite:
        saved = json.loads((WORK / "report.json").read_text())
        return write(saved["report"], argparse.Namespace(**saved["opts"]))

    from edgemoe_lab.peer.machine import disk_read_bandwidth, drop_caches, wait_quiet
    from edgemoe.store.manifest import read_manifest

    env = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    command = env + "python -m edgemoe_lab.experiments.verify_cost " + " ".join(sys.argv[1:])
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    models = prepare(log)
    mach = machine()
    report = {"command": command.strip(), "date": datetime.date.today().isoformat(), "machine": mach, "models": {},
              "isal": isal_info()}
    drop_caches()
    report["disk"] = disk_read_bandwidth(models["mixtral"] / "experts.bin", max_bytes=512 << 20)
    for name in opts.models.split(","):
        model = models[name]
        memory, info = budget_for(model, opts.budget_frac)
        expert_size = read_manifest(model).experts[0].size
        settings = [x for x in SETTINGS if x[2] != "isal" or has_isal()]
        labels = [x[0] for x in settings]
        runs: dict[str, list[dict]] = {x: [] for x in labels}
        ratios = {label: {"decode_tps": [], "read_s": [], "verify_s": []} for label in labels[1:]}
        quiet = []
        for rep in range(opts.repeats):
            quiet.append(wait_quiet(opts.wait_quiet, log=log))
            k = rep % len(settings)
            order = settings[k:] + settings[:k]  # rotated between repeats
            got = {}
            for label, verify, crc in order:
                r = got[label] = run(model, memory, verify, crc, opts.tokens)
                runs[label].append(r)
                log(f"{name} repeat {rep + 1} {label}: {r['stats']['decode_tps']:.2f} tok/s, "
                    f"read {r['stats']['read_s']:.3f} s, verify {r['stats']['verify_s']:.3f} s "
                    f"({r['verifications']} checks)")
            for label in labels[1:]:
                assert got[label]["token_ids"] == got["first"]["token_ids"], f"{label} gave other tokens"
                for key in ratios[label]:
                    ratios[label][key].append((got[label]["stats"][key], got["first"]["stats"][key]))
        quiet.append(wait_quiet(opts.wait_quiet, log=log))
        log(f"{name}: paired in-process comparison, {opts.rounds} rounds")
        pr = paired(model, memory, settings, opts.tokens, opts.rounds)
        for label in labels[1:]:
            for a, b in zip(pr[label], pr["first"]):
                assert a["token_ids"] == b["token_ids"], f"paired: {label} gave other tokens"
        report_paired = {
            label: {"decode_tps": statistics.median(x["decode_tps"] for x in rs),
                    "verify_s": statistics.median(x["verify_s"] for x in rs),
                    "read_s": statistics.median(x["read_s"] for x in rs),
                    "verifications": statistics.median(x["verifications"] for x in rs),
                    "bytes_read": statistics.median(x["bytes_read"] for x in rs),
                    "hit_rate": statistics.median(x["hit_rate"] for x in rs),
                    "ratio_decode_tps": statistics.median(a["decode_tps"] / b["decode_tps"]
                                                          for a, b in zip(rs, pr["first"]) if b["decode_tps"]),
                    "per_round_decode_tps": [x["decode_tps"] for x in rs]}
            for label, rs in pr.items()}
        report["models"][name] = {
            "paired": report_paired,
            "budget_bytes": memory, "resident_bytes": info["resident_bytes"], "expert_bytes": info["expert_bytes"],
            "cache_bytes": info["cache_bytes"],
            "experts": len(read_manifest(model).experts), "expert_payload_bytes": expert_size,
            "crc": crc_microbench(expert_size), "summary": summarize(runs),
            "ratio_over_first": {label: {k: round(ratio_median(v), 4) for k, v in r.items()}
                                 for label, r in ratios.items()},
            "quiet": quiet, "runs": {m: [{"stats": r["stats"], "verifications": r["verifications"],
                                           "verify_bytes": r["verify_bytes"], "load_s": r["load_s"]} for r in rs]
                                      for m, rs in runs.items()},
        }
    (WORK / "report.json").write_text(json.dumps({"report": report, "opts": vars(opts)}, indent=1))
    write(report, opts)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def write(rep: dict, opts) -> None:
    m = rep["machine"]
    d = rep["disk"]
    lines = [
        f"Command: `{rep['command']}`",
        "",
        "# `--verify always` vs `--verify first`",
        "",
        f"Date {rep['date']}. CPU: {m['cpu']} ({m['cpus']} CPUs); flags present: {', '.join(m['flags']) or 'none'}; "
        f"absent: {', '.join(m['flags_absent']) or 'none'}. {m['platform']}, Python {m['python']}.",
        f"Disk: {d['bytes_per_s'] / 1e9:.2f} GB/s sequential {d['mode']} reads of {_mb(d['chunk_bytes'])} "
        f"({_mb(d['bytes'])} of the Mixtral store, page cache dropped first).",
        "",
        f"Each run: a fresh process, page cache dropped, {opts.tokens} greedy tokens (EOS ignored) of a fixed prompt, "
        f"budget = the minimum that runs ({CTX}-token context) + {opts.budget_frac:.0%} of the expert bytes, the "
        "engine's defaults otherwise. "
        f"{opts.repeats} repeats, the settings alternating (order rotated); medians, and ratios to `first` taken "
        "within each repeat. Every setting gave the same tokens in every repeat. `first` and `always` checksum "
        "with zlib.crc32 (what the store uses without the optional isal package), `always, isal` with ISA-L's "
        "crc32 (same values"
        + (f"; isal {rep['isal']['version']} from {rep['isal']['path']}" if rep.get("isal") else "") + ").",
        "",
        "The machine is shared: other processes came and went during the fresh-process runs, and their decode "
        "tok/s swing by up to 4x within one setting. The paired runs (one process, settings taking turns every "
        "generate call) are the decode comparison; checksum seconds are measured inside each run and do not depend "
        "on the load.",
        "",
    ]
    summary = []
    for name, r in rep["models"].items():
        p = r.get("paired")
        if not p:
            continue
        parts = [f"`{label}` x{x['ratio_decode_tps']:.3f} ({x['verify_s']:.3f} s of checksums per "
                 f"{opts.tokens}-token call, {_mb(x['bytes_read'])} read in {x['read_s']:.2f} s)"
                 for label, x in p.items() if label != "first"]
        summary.append(f"- {name}: decode tok/s relative to `first` (paired medians): " + "; ".join(parts) + ".")
    if summary:
        lines += ["Summary:", "", *summary, ""]
    for name, r in rep["models"].items():
        s, q = r["summary"], r["ratio_over_first"]
        lines += [
            f"## {name}",
            "",
            f"{r['experts']} experts of {_mb(r['expert_payload_bytes'])} ({_mb(r['expert_bytes'])}), resident "
            f"{_mb(r['resident_bytes'])}, budget {_mb(r['budget_bytes'])} (expert cache {_mb(r['cache_bytes'])}); "
            "CPUs busy before each repeat and before the paired run: "
            + ", ".join(f"{100 * x['cpu_busy']:.0f}%" for x in r["quiet"]) + ".",
            "",
            "| verify | decode tok/s | prefill s | decode s | read s | checksum s | checksum / (prefill + decode) "
            "| checks | checked bytes | bytes read | hit rate | stall s | peak RSS | I/O |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for mode in s:
            x = s[mode]
            lines.append(f"| {mode} | {x['decode_tps']:.2f} | {x['prefill_s']:.3f} | {x['decode_s']:.3f} | "
                         f"{x['read_s']:.3f} | {x['verify_s']:.3f} | {100 * x['verify_share']:.2f}% | "
                         f"{x['verifications']:.0f} | {_mb(x['verify_bytes'])} | "
                         f"{_mb(x['bytes_read'])} | {100 * x['hit_rate']:.1f}% | {x['stall_s']:.3f} | "
                         f"{_mb(x['peak_rss_bytes'])} | {x['io']} |")
        if "paired" in r:
            p = r["paired"]
            lines += [
                "",
                f"Paired, in one process ({len(p['first']['per_round_decode_tps'])} rounds of {opts.tokens} tokens, "
                "the settings taking turns on one engine after a warm-up; `first` then checks nothing):",
                "",
                "| verify | decode tok/s (median) | / first (median of per-round ratios) | checksum s per round | checks "
                "per round | read s per round | bytes read per round | hit rate |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for label, x in p.items():
                lines.append(f"| {label} | {x['decode_tps']:.2f} | x{x['ratio_decode_tps']:.3f} | {x['verify_s']:.3f} | "
                             f"{x['verifications']:.0f} | {x['read_s']:.3f} | {_mb(x['bytes_read'])} | "
                             f"{100 * x['hit_rate']:.1f}% |")
            lines += ["", "Per round (decode tok/s):", ""]
            lines += [f"- {label}: " + ", ".join(f"{v:.2f}" for v in x["per_round_decode_tps"]) for label, x in p.items()]
        crc = ", ".join(f"{k} {v['gb_per_s']} GB/s" for k, v in r["crc"].items())
        lines.append("")
        for label, x in q.items():
            lines.append(f"- {label} / first, median of per-repeat ratios: decode tok/s x{x['decode_tps']:.3f}, read s "
                         f"x{x['read_s']:.3f}, checksum s x{x['verify_s']:.2f}.")
        lines += [
            "",
            f"Checksum alone on one expert's payload ({_mb(r['expert_payload_bytes'])}): {crc}.",
            "",
            "Per run (decode tok/s; checksum s):",
            "",
        ]
        for mode in r["runs"]:
            vals = "; ".join(f"{x['stats']['decode_tps']:.2f}; {x['stats']['verify_s']:.3f}" for x in r["runs"][mode])
            lines.append(f"- {mode}: {vals}")
        lines.append("")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "verify_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
