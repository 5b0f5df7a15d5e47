"""`edgemoe bench`: edgemoe side by side with llama.cpp and transformers (accelerate disk
offload), on the same weights and the same token stream, each run in its own process
inside a memory cgroup limited to a fraction of the quantized model size.

    edgemoe bench --setup                      # once: the peers' environment (llama.cpp, accelerate)
    edgemoe bench                              # the comparison -> edgemoe_lab/results/peer/
    edgemoe bench --model bundled --budgets 100 --repeats 1 --engines edgemoe --no-cgroup
    edgemoe bench --model Qwen3-30B-A3B-Q4_K_M.gguf  # from a GGUF: llama.cpp runs the file as it is,
                                                     # edgemoe converts it (transformers needs a directory)

This module parses and checks the flags; the comparison itself is the lab's
(`edgemoe_lab.peer.harness.Bench`; edgemoe_lab/peer/ holds the pieces). README
"Benchmark against llama.cpp" says how to read the results.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from edgemoe_lab.peer.harness import QTYPES

from ..errors import InvalidArgument


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemoe bench",
        description="Compare edgemoe with llama.cpp and transformers+accelerate on the same weights and token "
                    "stream, each run in a memory cgroup limited to a fraction of the quantized model size. Writes "
                    "results.json, results.md and PNG plots to --out.",
    )
    p.add_argument("--setup", action="store_true",
                   help="create the peers' environment (llama.cpp bindings, gguf, accelerate) under --work and exit")
    p.add_argument("--model", default="random",
                   help="'random' (a random Mixtral-shaped 2.3 B model, written once into --work), 'bundled' (the "
                        "bundled trained tiny MoE: realistic routing), a Hugging Face MoE directory, or a GGUF file "
                        "(llama.cpp runs the file as it is; edgemoe converts it, keeping its precision unless --bits "
                        "is given; transformers needs a Hugging Face directory and is skipped)")
    p.add_argument("--bits", type=int, choices=sorted(QTYPES), default=None,
                   help="expert bits for edgemoe and the matching GGUF type (4: Q4_0, 8: Q8_0); default 4. With a GGUF "
                        "--model: edgemoe re-quantizes its experts to these bits (default: the file's own precision)")
    p.add_argument("--engines", default="edgemoe,llama.cpp,transformers",
                   help="comma-separated engines to run (default: all three)")
    p.add_argument("--configs", default=None,
                   help="comma-separated configuration names (default: all; see edgemoe_lab/peer/configs.py)")
    p.add_argument("--budgets", default="100,50,25",
                   help="memory limits in percent of the quantized model size (default 100,50,25)")
    p.add_argument("--limit-adds-overhead", action="store_true", default=None,
                   help="make each engine's cgroup limit its budget plus its own measured process overhead (the "
                        "budget then covers the model's bytes only); the default for --model bundled, whose 5 MB "
                        "would otherwise be far below any runtime's baseline")
    p.add_argument("--no-unlimited", action="store_true",
                   help="skip the reference runs without a memory limit")
    p.add_argument("--repeats", type=int, default=3, help="repeats of every run, engines alternating (default 3)")
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per run (default 32)")
    p.add_argument("--prompt", default=None, help="prompt text (default: a short Python snippet)")
    p.add_argument("--timeout", type=float, default=300, help="time limit of one run in seconds (default 300)")
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: all CPUs)")
    p.add_argument("--resident", choices=("int8", "int4", "float"), default=None,
                   help="non-expert weights of the quantized edgemoe stores (IO-QEXP, LRU-only, EdgeMoE, IO-FREE), "
                        "as llama.cpp's GGUF quantizes attention too: int4 (the experts' int4 layout, near Q4_0's "
                        "bytes; the default with --bits 4), int8 (the default with --bits 8 and for a GGUF --model "
                        "kept at its own precision) or float (bf16); IO-EXP stays bf16")
    p.add_argument("--plan", default=None, metavar="PLAN.json",
                   help="per-expert bitwidth plan for the full EdgeMoE configuration (edgemoe convert --plan)")
    p.add_argument("--no-cgroup", action="store_true", help="run without memory cgroups (no limits enforced)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each repeat, wait up to SECONDS for other processes to leave the CPUs idle")
    p.add_argument("--out", default="edgemoe_lab/results/peer", help="output directory (default edgemoe_lab/results/peer)")
    p.add_argument("--work", default="edgemoe_lab/work/peer",
                   help="work directory for models, converted files and the peers' environment (default edgemoe_lab/work/peer)")
    p.add_argument("--peers-python", default=None,
                   help="python of the peers' environment (default: WORK/peers/bin/python)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    return p


def check_options(opts: argparse.Namespace):
    """The comparison's flags, checked before anything runs: (budget fractions, engines,
    configurations). Raises InvalidArgument naming the flag."""
    from edgemoe_lab.peer import configs as C

    if opts.repeats < 1 or opts.tokens < 2:
        raise InvalidArgument("--repeats must be at least 1 and --tokens at least 2")
    try:
        fractions = [float(b.strip().rstrip("%")) / 100 for b in opts.budgets.split(",") if b.strip()]
    except ValueError:
        raise InvalidArgument(f"--budgets {opts.budgets!r}: give percentages such as 100,50,25") from None
    if any(f <= 0 for f in fractions):
        raise InvalidArgument("--budgets must be positive percentages")
    engines = [e.strip() for e in opts.engines.split(",") if e.strip()]
    bad = set(engines) - set(C.ENGINES)
    if bad:
        raise InvalidArgument(f"--engines: unknown {sorted(bad)}; choose from {', '.join(C.ENGINES)}")
    try:
        cfgs = C.select(opts.configs.split(",") if opts.configs else None, engines)
    except ValueError as e:
        raise InvalidArgument(f"--configs: {e}") from None
    return fractions, engines, cfgs


def setup_peers(opts: argparse.Namespace) -> int:
    """--setup: create the peers' environment and say what it holds."""
    from edgemoe_lab.peer import peers

    venv = Path(opts.peers_python).parent.parent if opts.peers_python else Path(opts.work) / "peers"
    try:
        py = peers.setup(venv, log=lambda m: print(f"[bench setup] {m}", file=sys.stderr))
        info = peers.check_llama(py)
        tinfo = peers.check_transformers(py)
    except (peers.PeerError, subprocess.CalledProcessError) as e:
        print(f"edgemoe bench --setup: {e}", file=sys.stderr)
        return 1
    print(f"peers ready in {venv}: ik-llama-cpp-python {info['version']} (converter {info['converter']}, "
          f"quantize {info['quantize']}); transformers {tinfo['transformers']}, accelerate {tinfo['accelerate']}")
    return 0


def main(argv: list[str]) -> int:
    opts = build_parser().parse_args(argv)
    from .common import check_output_dir

    check_output_dir(opts.out, "--out")
    check_output_dir(opts.work, "--work")
    if opts.setup:
        return setup_peers(opts)
    fractions, engines, cfgs = check_options(opts)
    from edgemoe_lab.peer.harness import Bench

    return Bench(opts, argv).main(fractions, engines, cfgs)
