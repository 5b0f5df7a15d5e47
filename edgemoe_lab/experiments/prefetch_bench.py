"""Preloading on the 2.3 B bench model out of RAM (issue 16 section 3: "show both goals on
the bench model at 50% and 25%"): no preloading, the old preloading (forced on) and the
default one (switched by measured speed), each a fresh process in a memory cgroup limited
as `edgemoe bench` limits the EdgeMoE row at that budget.

    python -m edgemoe_lab.experiments.prefetch_bench --model DIR \\
        --point 50%:MEMORY:LIMIT --point 25%:MEMORY:LIMIT [--repeats 3] [--tokens 96] -o OUT.md

Each run is `edgemoe generate --json` on the bench prompt (greedy, --ignore-eos, context
256, two threads), the page cache dropped before it (huge_pages.run_one). Variants
alternate within a repeat, rotated between repeats; speed ratios to "no preloading" are
taken within a repeat. Stall hidden = 1 - stall / stall without preloading. The greedy
tokens must be identical across variants (checked).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

from edgemoe.utils import format_bytes
from edgemoe_lab.experiments.huge_pages import run_variants, write_report
from edgemoe_lab.peer import cgroup as cg
from edgemoe_lab.peer.machine import cpu_model

VARIANTS = {
    "no preloading": ["--no-prefetch"],
    "old preloading (forced on)": ["--prefetch-threshold", "0", "--no-prefetch-pacing"],
    "default (switched)": [],
}
BASE = "no preloading"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--point", action="append", required=True, metavar="LABEL:MEMORY:LIMIT",
                   help="a budget label, edgemoe's --memory and the cgroup limit, in bytes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--out", required=True)
    a = p.parse_args(argv)
    points = []
    for spec in a.point:
        label, memory, limit = spec.split(":")
        points.append((label, int(memory), int(limit)))
    ctl, why = cg.detect()
    if ctl is None:
        sys.exit(f"prefetch_bench: needs a memory cgroup ({why})")
    t0, load0 = time.time(), os.getloadavg()
    res = run_variants(ctl, a, points, {name: (True, flags) for name, flags in VARIANTS.items()})
    ids = {tuple(r["ids"]) for rows in res.values() for r in rows}
    med = statistics.median
    L = ["# Preloading on the bench model out of RAM (issue 16, section 3)", "",
         f"Command: `python -m edgemoe_lab.experiments.prefetch_bench {' '.join(argv or sys.argv[1:])}` "
         f"({time.strftime('%Y-%m-%d %H:%M')}, {cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}; "
         f"{time.time() - t0:.0f} s). Load average {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after.", "",
         f"Model {a.model}; {a.tokens} greedy tokens after the bench prompt, context 256, {a.threads} threads; "
         f"medians of {a.repeats} repeats, each run a fresh process in a fresh memory cgroup with the page cache "
         "dropped. Budgets: " + "; ".join(f"{lbl}: `--memory {m}` ({format_bytes(m)}), cgroup limit "
                                        f"{format_bytes(lim)}" for lbl, m, lim in points)
         + ". Greedy tokens identical in every run: "
         f"{'yes' if len(ids) == 1 else 'NO (' + str(len(ids)) + ' different streams)'}. Compute per token = "
         "time per token of the no-preloading run less its stall.", "",
         "| budget | variant | decode tok/s | vs no preloading | stall ms/token | stall hidden | read MB/token |",
         "|---|---|---|---|---|---|---|"]
    for label, _, _ in points:
        base = {r["repeat"]: r for r in res[(label, BASE)]}
        for name in VARIANTS:
            rows = res[(label, name)]
            ratio = [r["decode_tps"] / base[r["repeat"]]["decode_tps"] for r in rows]
            hidden = [1 - r["stall_ms"] / base[r["repeat"]]["stall_ms"] for r in rows]
            L.append(f"| {label} | {name} | {med(r['decode_tps'] for r in rows):.2f} | {med(ratio):.2f}x "
                     f"({min(ratio):.2f}-{max(ratio):.2f}) | {med(r['stall_ms'] for r in rows):.1f} | "
                     + ("-" if name == BASE else f"{100 * med(hidden):.0f}%")
                     + f" | {med(r['mb_per_token'] for r in rows):.1f} |")
        b = res[(label, BASE)]
        compute = med(1000 / r["decode_tps"] - r["stall_ms"] for r in b)
        L.append(f"| {label} | (regime) | compute {compute:.1f} ms vs stall {med(r['stall_ms'] for r in b):.1f} ms "
                 "per token without preloading | | | | |")
    write_report(a.out, L, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
