"""Huge pages under the expert slab, and the loader reading a layer's misses ahead: what
each does to out-of-RAM decode, in and out of a tight memory cgroup.

Variants (each a fresh process; the page cache dropped before it):
- "huge pages + read-ahead": the defaults (`runtime/slab.py _ask_huge_pages`, RuntimeConfig
  read_ahead);
- "4 KiB pages": the slab without MADV_HUGEPAGE (the advice patched out in the child);
- "no read-ahead": `--no-read-ahead` (misses read in the compute thread, one at a time).

Each runs `edgemoe generate --json` on the same prompt (greedy, --ignore-eos), with the given
--memory, once in a memory cgroup of --limit bytes (as `edgemoe bench` runs an engine) and
once without a limit. Variants alternate within each repeat; ratios are taken within a
repeat. The greedy tokens must be identical across variants (checked).

    python -m edgemoe_lab.experiments.huge_pages --model DIR --memory BYTES --limit BYTES \\
        [--repeats 3] [--tokens 96] [--threads 2] -o OUT.md
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

from edgemoe.utils import format_bytes
from edgemoe_lab.peer import cgroup as cg
from edgemoe_lab.peer.harness import DEFAULT_PROMPT
from edgemoe_lab.peer.machine import cpu_model, drop_caches

VARIANTS = {  # name -> (huge pages, extra CLI flags)
    "huge pages + read-ahead": (True, []),
    "4 KiB pages": (False, []),
    "no read-ahead": (True, ["--no-read-ahead"]),
}
BASE = "huge pages + read-ahead"

CHILD = """
import runpy, sys
if sys.argv[1] == "0":
    import edgemoe.runtime.slab as slab
    slab._ask_huge_pages = lambda mm: False
sys.argv = ["edgemoe"] + sys.argv[2:]
runpy.run_module("edgemoe", run_name="__main__")
"""


def run_one(ctl, limit: int | None, huge: bool, flags: list[str], a) -> dict:
    args = [sys.executable, "-c", CHILD, "1" if huge else "0", "generate", a.model, "--memory", str(a.memory),
            "--ctx-size", "256", "-t", str(a.threads), "-n", str(a.tokens), "--ignore-eos", "--json",
            "-p", DEFAULT_PROMPT, *flags]
    drop_caches()
    group = cg.MemoryCgroup.create(ctl, f"huge-pages-{os.getpid()}", limit) if limit else None
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=600,
                              preexec_fn=group.join_self if group else None)
        peak = group.peak_bytes() if group else None
    finally:
        if group:
            group.remove()
    if proc.returncode != 0:
        raise RuntimeError(f"generate failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout)
    s = out["stats"]
    return {"decode_tps": s["decode_tps"], "prompt_tps": s["prompt_tps"], "read_bps": s.get("read_bandwidth_bps") or 0,
            "stall_ms": 1000 * s["decode_stall_s_per_token"], "mb_per_token": s["decode_bytes_read_per_token"] / 1e6,
            "ids": out["token_ids"], "cgroup_peak": peak}


def run_variants(ctl, a, points, variants: dict) -> dict:
    """Every variant (name -> (huge pages, flags)) at every point ((label, --memory, cgroup
    limit or None)), `a.repeats` times, the variants' order rotated between repeats.
    Returns {(label, variant): [rows]}, each row with its repeat."""
    res: dict = {}
    for rep in range(a.repeats):
        for label, memory, limit in points:
            names = list(variants)
            names = names[rep % len(names):] + names[:rep % len(names)]
            for name in names:
                huge, flags = variants[name]
                a.memory = memory
                row = run_one(ctl, limit, huge, flags, a)
                row["repeat"] = rep
                res.setdefault((label, name), []).append(row)
                print(f"repeat {rep + 1} {label:>18} {name:28s} decode {row['decode_tps']:6.2f} tok/s prefill "
                      f"{row['prompt_tps']:6.1f} stall {row['stall_ms']:6.1f} ms/token", flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--memory", type=int, required=True)
    p.add_argument("--limit", type=int, required=True, help="the cgroup limit in bytes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--out", required=True)
    a = p.parse_args(argv)
    ctl, why = cg.detect()
    if ctl is None:
        sys.exit(f"huge_pages: needs a memory cgroup ({why})")
    t0 = time.time()
    load0 = os.getloadavg()
    points = [(f"cgroup {format_bytes(a.limit)}", a.memory, a.limit), ("no limit", a.memory, None)]
    res = run_variants(ctl, a, points, VARIANTS)
    ids = {tuple(r["ids"]) for rows in res.values() for r in rows}
    med = statistics.median
    L = ["# Huge pages under the expert slab; reading a layer's misses ahead (issue 16)", "",
         f"Command: `python -m edgemoe_lab.experiments.huge_pages {' '.join(argv or sys.argv[1:])}` "
         f"({time.strftime('%Y-%m-%d %H:%M')}, {cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}; "
         f"{time.time() - t0:.0f} s). Load average {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after. THP: "
         f"{Path('/sys/kernel/mm/transparent_hugepage/enabled').read_text().strip()} (defrag "
         f"{Path('/sys/kernel/mm/transparent_hugepage/defrag').read_text().strip()}).", "",
         f"Model {a.model}, `--memory {a.memory}` ({format_bytes(a.memory)}), context 256, {a.tokens} greedy tokens "
         f"after the bench prompt, {a.threads} threads; medians of {a.repeats} repeats, each variant a fresh process "
         "with the page cache dropped. Speed ratios are to the defaults (huge pages + read-ahead) in the same repeat "
         "and limit (min-max). Greedy tokens identical in every run: "
         f"{'yes' if len(ids) == 1 else 'NO (' + str(len(ids)) + ' different streams)'}.", "",
         "| limit | variant | decode tok/s | vs defaults | prefill tok/s | vs defaults | expert reads GB/s | "
         "stall ms/token | read MB/token |", "|---|---|---|---|---|---|---|---|---|"]
    for label in dict.fromkeys(k[0] for k in res):
        base = {r["repeat"]: r for r in res[(label, BASE)]}
        for name in VARIANTS:
            rows = res[(label, name)]
            dr = [r["decode_tps"] / base[r["repeat"]]["decode_tps"] for r in rows]
            pr = [r["prompt_tps"] / base[r["repeat"]]["prompt_tps"] for r in rows]
            L.append(f"| {label} | {name} | {med(r['decode_tps'] for r in rows):.2f} | {med(dr):.2f}x "
                     f"({min(dr):.2f}-{max(dr):.2f}) | {med(r['prompt_tps'] for r in rows):.1f} | {med(pr):.2f}x "
                     f"({min(pr):.2f}-{max(pr):.2f}) | {med(r['read_bps'] for r in rows) / 1e9:.2f} | "
                     f"{med(r['stall_ms'] for r in rows):.1f} | {med(r['mb_per_token'] for r in rows):.1f} |")
    write_report(a.out, L, res)
    return 0


def write_report(out: str, lines: list[str], res: dict) -> None:
    """The markdown `lines` to `out`, and the runs (by (label, variant), without their
    token ids) to the .json next to it."""
    Path(out).write_text("\n".join(lines) + "\n")
    Path(out).with_suffix(".json").write_text(json.dumps(
        {f"{k[0]} | {k[1]}": [{x: y for x, y in r.items() if x != "ids"} for r in v] for k, v in res.items()},
        indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
