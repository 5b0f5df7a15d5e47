"""Start-up times of the `edgemoe` command (issue 17, section 7), before and after in one run.

"before" runs the package as committed at a git revision (default HEAD, extracted with
`git archive` into a temporary directory and put first on PYTHONPATH); "after" runs the
working tree. Rounds alternate between the two. Measured from the moment the process is
started:
  - `edgemoe generate --help` until exit;
  - an argument error (`edgemoe generate --mode nope`) until exit;
  - `edgemoe generate -p PROMPT` until the first generated text reaches stdout (the first
    token), and until exit, for the bundled model and for a converted copy of it run
    with --memory (the offloaded runtime);
  - for reference: `python -c "import torch"` (with and without the interpreter's
    finalization at exit), and `import edgemoe.api` (what loading a model needs before
    any file is read).

    .venv/bin/python -m edgemoe_lab.experiments.startup --rounds 7 --before 5f1aaf2 --wait-quiet 60 -o edgemoe_lab/results/startup.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgemoe_lab import paths  # noqa: E402

ROOT = paths.ROOT
PROMPT = "def fibonacci(n):"


def env_for(pythonpath: str | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


# Every command runs in an empty directory: `python -m` puts the working directory first on
# sys.path, which from the repository root would shadow the "before" copy.
RUN_DIR = Path(tempfile.mkdtemp(prefix="edgemoe-startup-cwd-"))


def time_exit(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300, cwd=RUN_DIR)
    return time.perf_counter() - t0


def time_first_token(cmd: list[str], env: dict) -> tuple[float, float]:
    """Seconds from start to the first byte of generated text on stdout, and to exit."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=RUN_DIR)
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t0
    p.stdout.read()
    p.wait(timeout=300)
    if not first or p.returncode:
        raise SystemExit(f"{' '.join(cmd)}: no output (exit {p.returncode})")
    return t_first, time.perf_counter() - t0


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--before", default="HEAD", help="git revision for the 'before' column (default HEAD)")
    ap.add_argument("-o", "--output", default=None, help="write the Markdown report here")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each round, wait up to SECONDS for other processes to leave the CPUs idle")
    args = ap.parse_args()

    from edgemoe import assets
    from edgemoe_lab.peer.machine import cpu_model

    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="edgemoe-startup-"))
    before = tmp / "before"
    before.mkdir()
    archive = subprocess.run(["git", "archive", args.before, "edgemoe"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
    rev = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    converted = tmp / "tiny-moe-converted"
    subprocess.run([py, "-m", "edgemoe", "convert", str(assets.MODEL_DIR), str(converted), "-q"], check=True,
                   env=env_for(None), stderr=subprocess.DEVNULL)
    budget = "64MB"  # above every expert and, at revision 5f1aaf2, the oneDNN reserve (28 MB minimum there)

    gen = [py, "-m", "edgemoe", "generate", "-p", PROMPT, "-n", "16", "--temperature", "0"]
    cases = {
        "`edgemoe generate --help`, to exit": ("exit", [py, "-m", "edgemoe", "generate", "--help"]),
        "argument error (`generate --mode nope`), to exit": ("exit", [py, "-m", "edgemoe", "generate", "--mode", "nope"]),
        "bundled model, to the first token": ("first", gen),
        f"converted copy, `--memory {budget}`, to the first token": ("first", gen[:4] + [str(converted), "--memory", budget] + gen[4:]),
        "`python -c 'import torch'`, to exit": ("exit", [py, "-c", "import torch"]),
        "`python -c 'import torch'` ending with os._exit (no finalization)": (
            "exit", [py, "-c", "import torch, os; os._exit(0)"]),
        "`python -c 'import edgemoe.api'`, to exit": ("exit", [py, "-c", "import edgemoe.api"]),
    }
    sides = {"before": env_for(str(before)), "after": env_for(None)}
    for side, env in sides.items():
        where = subprocess.run([py, "-c", "import edgemoe; print(edgemoe.__file__)"], env=env, cwd=RUN_DIR,
                               capture_output=True, text=True, check=True).stdout.strip()
        expect = before if side == "before" else ROOT
        if not Path(where).is_relative_to(expect):
            raise SystemExit(f"the {side} side imports {where}, not the package under {expect}")
    results: dict[tuple[str, str], list[float]] = {}
    exits: dict[tuple[str, str], list[float]] = {}
    busy = []
    for r in range(args.rounds):
        if args.wait_quiet:
            from edgemoe_lab.peer.machine import wait_quiet

            busy.append(wait_quiet(args.wait_quiet)["cpu_busy"])
        for label, (kind, cmd) in cases.items():
            for side, env in (sides.items() if r % 2 == 0 else reversed(list(sides.items()))):
                if kind == "exit":
                    results.setdefault((label, side), []).append(time_exit(cmd, env))
                else:
                    first, total = time_first_token(cmd, env)
                    results.setdefault((label, side), []).append(first)
                    exits.setdefault((label, side), []).append(total)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    import torch

    lines = [
        "# Start-up times of the `edgemoe` command",
        "",
        f"Command: `{Path(py).relative_to(ROOT) if Path(py).is_relative_to(ROOT) else py} -m edgemoe_lab.experiments.startup "
        f"--rounds {args.rounds}{'' if args.before == 'HEAD' else ' --before ' + args.before}"
        f"{f' --wait-quiet {args.wait_quiet:g}' if args.wait_quiet else ''}"
        f"{' -o ' + args.output if args.output else ''}` (from the repository root).",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPUs; Python {platform.python_version()}, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}."
        + (f" CPUs busy with other work before each round (3 s sample): {', '.join(f'{100 * b:.0f}%' for b in busy)}."
           if busy else ""),
        "",
        f"\"before\" is the package at git revision {rev} (run from a `git archive` copy), \"after\" the working tree "
        f"with the changes of issue 17 section 7: torch and the runtime imported only after the arguments are "
        f"parsed, and the process ended without the interpreter's finalization once a command that loaded torch "
        f"is done (exit handlers still run; edgemoe/cli/__init__.py). Times in seconds from process start: median "
        f"over {args.rounds} rounds (min-max), the two sides alternating within each round. The prompt is `" + PROMPT + "`, 16 tokens, greedy; the first token "
        "is the first byte of generated text on stdout.",
        "",
        "| measurement | before | after | after / before |",
        "|---|---|---|---|",
    ]
    for label in cases:
        b, a = results[(label, "before")], results[(label, "after")]
        lines.append(f"| {label} | {summary(b)} | {summary(a)} | {statistics.median(a) / statistics.median(b):.2f} |")
    for label in cases:
        if (label, "after") in exits:
            b, a = exits[(label, "before")], exits[(label, "after")]
            lines.append(f"| {label.replace('to the first token', 'to exit')} | {summary(b)} | {summary(a)} | "
                         f"{statistics.median(a) / statistics.median(b):.2f} |")
    med = {k: statistics.median(v) for k, v in results.items()}
    first = med[("bundled model, to the first token", "after")]
    torch_import = med[("`python -c 'import torch'` ending with os._exit (no finalization)", "after")]
    finalize = med[("`python -c 'import torch'`, to exit", "after")] - torch_import
    lines += [
        "",
        f"Reading: help and argument errors answer in {med[('`edgemoe generate --help`, to exit', 'after')]:.3f} s "
        f"and {med[('argument error (`generate --mode nope`), to exit', 'after')]:.3f} s (the goal: under 0.3 s). "
        f"The first token of the bundled model comes {first:.2f} s after the process starts, of which starting "
        f"Python and importing torch take {torch_import:.2f} s ({100 * torch_import / first:.0f}%); loading the "
        f"14.7 MB model, the tokenizer and the first forward pass take the rest. The interpreter's finalization "
        f"with torch loaded costs {finalize:.2f} s at exit, which the command no longer pays.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
