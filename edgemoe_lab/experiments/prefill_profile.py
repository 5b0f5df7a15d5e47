"""Where a prompt's forward (prefill) goes, and prefill speed against another tree (issue 15, section 6).

Two measurements, both compute-only (mode="io-free": every expert read at load):

1. Profile. A child process loads the model and prefills the same prompt of --tokens
   tokens again and again (a fresh KV cache each time, so nothing is reused) while py-spy
   (a sampling profiler that reads the process from outside) samples its main thread with
   native frames. Each sample gets a *part* of the model, from the Python frames on its
   stack (routed experts, resident layers, attention, router, MoE bookkeeping, norms, ...),
   and a *kind*, from its innermost frame (edgemoe's packed kernel, edgemoe's
   dequantization, the float matmul it feeds (oneDNN/MKL), thread waits, Python, torch's
   elementwise kernels, torch dispatch and allocation). oneDNN's JIT-compiled kernels have
   no symbols: an unsymbolized frame under a matmul call counts as the float matmul.
   With --profile-base the --compare tree is profiled the same way (before and after).

2. Speed (--compare DIR). The same prompt is prefilled by this tree and by the tree at
   DIR (e.g. `git archive HEAD | tar -x -C DIR` before a change), each in its own fresh
   process, alternating which goes first, --repeats times per thread count. A process
   warms up with one prefill and reports the best of three; the ratio is taken within
   each repeat. With --llama-gguf, this tree is timed against llama.cpp (the peer
   benchmark's ik-llama-cpp-python bindings, --llama-python) on a GGUF of the same model,
   on the same prompt ids, in the same way.

    python -m edgemoe_lab.experiments.prefill_profile --model /path/to/converted-model \\
        --tokens 512 --threads 1 --threads 2 --compare /tmp/base-tree --profile-base \\
        -o edgemoe_lab/results/prefill_profile.md
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgemoe_lab.peer.machine import cpu_model

# Runs in either tree (only the public API): prints one JSON line {"tok_s": [...]} per
# prefill after the warm-up. argv: model, threads, tokens, timed prefills, seconds to
# keep going (profile mode; 0: none), ready file ("-": none).
CHILD = r"""
import json, sys, time
from pathlib import Path
import torch, edgemoe
model, ready = sys.argv[1], sys.argv[6]
threads, tokens, runs, seconds = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
ids = torch.randint(3, vocab, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
eng = edgemoe.load(model, mode="io-free", threads=threads)
def once():
    cache = eng.new_cache()
    t0 = time.perf_counter()
    for _ in eng.stream(ids, cache=cache, max_tokens=1, temperature=0):
        break
    return time.perf_counter() - t0
once()
if ready != "-":
    Path(ready).write_text(str(__import__("os").getpid()))
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        once()
times = [once() for _ in range(runs)]
print(json.dumps({"tok_s": [tokens / t for t in times]}))
"""

# llama.cpp through the C API of the ik-llama-cpp-python bindings (as the peer benchmark's
# llama_run.py child): the same prompt ids decoded as one batch into a fresh context,
# weights memory-mapped (warm after the first run), no repacking. argv: GGUF, threads,
# ids JSON file, timed prefills; prints {"tok_s": [...]} after one warm-up prefill.
LLAMA_CHILD = r"""
import json, sys, time
from ik_llama_cpp import _ctypes_api as C
gguf, threads, ids, runs = sys.argv[1], int(sys.argv[2]), json.load(open(sys.argv[3])), int(sys.argv[4])
C.llama_backend_init()
mp = C.llama_model_default_params()
mp.n_gpu_layers, mp.use_mmap = 0, True
if hasattr(mp, "repack_tensors"):
    mp.repack_tensors = False
model = C.llama_model_load_from_file(gguf.encode(), mp)
if not model:
    sys.exit(f"llama.cpp could not load {gguf}")
def once():
    cp = C.llama_context_default_params()
    cp.n_ctx = cp.n_batch = max(512, len(ids))
    cp.n_seq_max, cp.n_threads, cp.n_threads_batch, cp.flash_attn = 1, threads, threads, False
    ctx = C.llama_init_from_model(model, cp)
    batch = C.llama_batch_init(len(ids), 0, 1)
    batch.n_tokens = len(ids)
    for i, t in enumerate(ids):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, int(i == len(ids) - 1)
        batch.seq_id[i][0] = 0
    t0 = time.perf_counter()
    rc = C.llama_decode(ctx, batch)
    dt = time.perf_counter() - t0
    C.llama_batch_free(batch)
    C.llama_free(ctx)
    if rc:
        sys.exit(f"llama_decode returned {rc}")
    return dt
once()
print(json.dumps({"tok_s": [len(ids) / once() for _ in range(runs)]}))
"""

# The part of the model a sample is in: the first pattern (in this order) that a Python
# frame of its stack matches.
PARTS = [
    ("routed experts", r"QuantExpert\.__call__|\(edgemoe/quant/experts\.py"),
    ("resident linear layers", r"QuantLinear\.forward|\(edgemoe/quant/linear\.py"),
    ("router", r"\(edgemoe/models/routers\.py"),
    ("MoE bookkeeping (gathers, scatters, sums)", r"\(edgemoe/models/moe\.py"),
    ("attention (scores, softmax, RoPE, KV cache)", r"\(edgemoe/models/(attention|rope)\.py"),
    ("norms", r"\(edgemoe/(models/norms|fastops)\.py"),
    ("LM head, embedding, sampling", r"\(edgemoe/(models/base|generate|sample)\.py"),
]
# The kind of work of the innermost frame.
KINDS = [
    ("packed kernel (em_qmm8, em_expert8)", r"row8?_b\d|em_\w+_(qmm|expert)"),
    ("dequantize (em_dequant)", r"em_\w+_dequant"),
    ("float matmul (oneDNN, MKL)", r"dnnl|brgemm|jit_|mkl_|gemm|gemv"),
    ("thread waits", r"gomp|futex|sched_yield|pthread_cond|barrier|^omp_"),
    ("allocation", r"malloc|^free$|^cfree|munmap|mmap|empty_generic|empty_cpu|TensorImpl|StorageImpl|posix_memalign"),
    ("torch elementwise and copies", r"VectorizedLoop|vectorized_loop|cpu_kernel|basic_loop|reduce|softmax|Vectorized<"
                                     r"|topk|sort|index|embedding|cat_|copy|function_ref|mem(cpy|move|set)|silu|sigmoid"
                                     r"|exp_|flash_attention|scatter|gather"),
]


def classify(frames: list[str]) -> tuple[str, str]:
    """(part, kind) of one sample, frames outermost first ("name (file:line)" or "symbol (library)")."""
    part = "other"
    for name, pattern in PARTS:
        if any(re.search(pattern, f) for f in frames):
            part = name
            break
    leaf = frames[-1]
    if re.search(r"\.py:\d+\)$", leaf) or "libpython" in leaf:
        return part, "Python interpreter"
    symbol, _, lib = leaf.rpartition(" (")
    if "libgomp" in lib:
        return part, "thread waits"
    for name, pattern in KINDS:
        if re.search(pattern, symbol):
            return part, name
    py = [f for f in frames if re.search(r"\.py:\d+\)$", f)]
    if symbol.startswith("0x") and "?" in lib and py and re.search(r"linear|matmul|_attend|scaled_dot", py[-1]):
        return part, "float matmul (oneDNN, MKL)"  # JIT code has no symbol
    if re.search(r"libtorch|libc10", lib):
        return part, "torch dispatch"
    return part, "other native"


def analyse(raw: Path) -> dict:
    """Shares of the main thread's samples per part, per kind, and per (part, kind)."""
    total, cells = 0, collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames[0].endswith("MainThread"):
            continue
        total += int(count)
        cells[classify(frames[1:])] += int(count)
    if not total:
        raise SystemExit(f"{raw}: no main-thread samples")
    parts, kinds = collections.Counter(), collections.Counter()
    for (p, k), n in cells.items():
        parts[p] += n
        kinds[k] += n
    return {"samples": total,
            "parts": {p: n / total for p, n in parts.most_common()},
            "kinds": {k: n / total for k, n in kinds.most_common()},
            "cells": [[p, k, n / total] for (p, k), n in cells.most_common()]}


def run_child(tree: Path, model: str, threads: int, tokens: int, runs: int, seconds: float = 0.0,
              ready: str = "-", wait: bool = True):
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-c", CHILD, model, str(threads), str(tokens), str(runs), str(seconds), ready]
    proc = subprocess.Popen(cmd, env=env, cwd=str(tree), stdout=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"the prefill child in {tree} exited with {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])["tok_s"]


def profile(tree: Path, model: str, threads: int, tokens: int, seconds: float, rate: int, py_spy: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ready, raw = Path(tmp, "ready"), Path(tmp, "samples.raw")
        proc = run_child(tree, model, threads, tokens, 3, seconds + 5, str(ready), wait=False)
        while not ready.exists():
            if proc.poll() is not None:
                raise SystemExit(f"the profiled child exited with {proc.returncode}")
            time.sleep(0.2)
        subprocess.run([py_spy, "record", "--pid", ready.read_text(), "--native", "--threads", "--rate", str(rate),
                        "--duration", str(int(seconds)), "--format", "raw", "-o", str(raw)],
                       check=True, capture_output=True)
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"the profiled child exited with {proc.returncode}")
        result = analyse(raw)
    result.update(threads=threads, tokens=tokens, tok_s=max(json.loads(out.strip().splitlines()[-1])["tok_s"]),
                  tree=str(tree))
    return result


def compare(new: Path, base: Path, model: str, threads: int, tokens: int, repeats: int) -> dict:
    rows = []
    for r in range(repeats):
        order = [("new", new), ("base", base)] if r % 2 == 0 else [("base", base), ("new", new)]
        got = {name: max(run_child(tree, model, threads, tokens, 3)) for name, tree in order}
        rows.append({"first": order[0][0], **got, "ratio": got["new"] / got["base"]})
    return {"threads": threads, "tokens": tokens, "repeats": rows,
            "median_ratio": statistics.median(r["ratio"] for r in rows)}


def prompt_ids(model: str, tokens: int) -> list[int]:
    """The prompt CHILD builds (the same generator and seed)."""
    import torch

    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    return torch.randint(3, vocab, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()


def against_llama(new: Path, model: str, gguf: str, python: str, threads: int, tokens: int, repeats: int) -> dict:
    """This tree against llama.cpp on the same prompt ids, alternating which runs first."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp, "ids.json")
        ids.write_text(json.dumps(prompt_ids(model, tokens)))
        for r in range(repeats):
            got = {}
            for name in (("new", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "new")):
                if name == "new":
                    got[name] = max(run_child(new, model, threads, tokens, 3))
                    continue
                res = subprocess.run([python, "-c", LLAMA_CHILD, gguf, str(threads), str(ids), "3"],
                                     capture_output=True, text=True)
                if res.returncode:
                    raise SystemExit(f"the llama.cpp child exited with {res.returncode}: {res.stderr[-400:]}")
                got[name] = max(json.loads(res.stdout.strip().splitlines()[-1])["tok_s"])
            rows.append({"first": "new" if r % 2 == 0 else "llama.cpp", **got, "ratio": got["new"] / got["llama.cpp"]})
    return {"threads": threads, "tokens": tokens, "repeats": rows,
            "median_ratio": statistics.median(r["ratio"] for r in rows)}


def _ratio_table(title: str, note: str, other: str, rows: list[dict]) -> list[str]:
    """A section of the report: each repeat's tok/s of `other` and of this tree, then the
    median ratio per (threads, prompt tokens)."""
    out = [title, "", note, "",
           f"| threads | prompt tokens | repeat | first | {other} tok/s | new tok/s | new / {other} |",
           "|---|---|---|---|---|---|---|"]
    for c in rows:
        for i, r in enumerate(c["repeats"]):
            out.append(f"| {c['threads']} | {c['tokens']} | {i + 1} | {r['first']} | {r[other]:.1f} | "
                       f"{r['new']:.1f} | {r['ratio']:.2f}x |")
    out += ["", f"| threads | prompt tokens | median new / {other} |", "|---|---|---|"]
    out += [f"| {c['threads']} | {c['tokens']} | **{c['median_ratio']:.2f}x** |" for c in rows]
    return out + [""]


def render(profiles: list[dict], comparisons: list[dict], command: str, model: str, base: str | None,
           loads: tuple, llama: list[dict] | None = None, gguf: str | None = None) -> str:
    from edgemoe.quant.native import cpu_id, isa

    lines = [
        "# Where prefill time goes, and prefill speed before and after",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, edgemoe's kernels: {isa() or 'torch fallback'}. "
        f"Load average at the start {loads[0]:.2f}, at the end {os.getloadavg()[0]:.2f} (a shared machine: other "
        "processes take CPU time, so absolute speeds are noisy; the ratios are taken within each repeat).",
        "",
        f"CPU {cpu_id()}",
        "",
        f"Model: `{model}`, mode io-free (compute only). Method: see the module docstring "
        "(edgemoe_lab/experiments/prefill_profile.py).",
        "",
    ]
    if comparisons:
        lines += _ratio_table(f"## Prefill tokens/s: this tree (new) against `{base}` (base)",
                              "Best of three prefills per process, one process per tree and repeat, the order "
                              "alternating.", "base", comparisons)
    if llama:
        lines += _ratio_table(f"## Prefill tokens/s: this tree against llama.cpp on `{gguf}`",
                              "Best of three prefills per process (llama.cpp: one batch into a fresh context, weights "
                              "memory-mapped and warm), the order alternating.", "llama.cpp", llama)
    for p in profiles:
        which = "base" if base and p["tree"] == base else "this tree"
        lines += [f"## Profile ({which}): {p['tokens']} prompt tokens, {p['threads']} thread(s), {p['tok_s']:.1f} "
                  f"tok/s, {p['samples']} samples", "",
                  "Share of the main thread's samples by part of the model, then by kind of work.", "",
                  "| part | share |", "|---|---|"]
        lines += [f"| {k} | {100 * v:.1f}% |" for k, v in p["parts"].items()]
        lines += ["", "| kind | share |", "|---|---|"]
        lines += [f"| {k} | {100 * v:.1f}% |" for k, v in p["kinds"].items()]
        lines += ["", "Largest (part, kind) cells:", "", "| part | kind | share |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {100 * v:.1f}% |" for a, b, v in p["cells"][:14]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a converted model directory")
    ap.add_argument("--tokens", type=int, action="append", help="prompt tokens (repeatable; default 512)")
    ap.add_argument("--threads", type=int, action="append", help="threads (repeatable; default 1 and 2)")
    ap.add_argument("--seconds", type=float, default=20.0, help="profiled time per (tokens, threads); 0: no profile")
    ap.add_argument("--rate", type=int, default=200, help="samples per second")
    ap.add_argument("--py-spy", default=shutil.which("py-spy"), help="the py-spy executable")
    ap.add_argument("--compare", type=Path, help="another tree (a checkout's root) to time against this one")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats of the comparison")
    ap.add_argument("--profile-base", action="store_true", help="also profile the --compare tree (before/after)")
    ap.add_argument("--llama-gguf", help="also time llama.cpp on this GGUF of the same model (e.g. the peer "
                                         "benchmark's Q4_0 file)")
    ap.add_argument("--llama-python", default=sys.executable,
                    help="a Python with ik-llama-cpp-python installed (the peer benchmark's venv)")
    ap.add_argument("-o", "--out", type=Path, required=True, help="results markdown (a .json is written beside it)")
    args = ap.parse_args(argv)
    tokens, threads = args.tokens or [512], args.threads or [1, 2]
    model = str(Path(args.model).resolve())
    if not (Path(model) / "config.json").is_file():
        ap.error(f"--model {args.model}: no config.json there (expected a converted model directory)")
    if any(t < 2 for t in tokens) or any(t < 1 for t in threads) or args.repeats < 1:
        ap.error("--tokens must be >= 2, --threads and --repeats >= 1")
    if args.compare is not None and not (args.compare / "edgemoe" / "__init__.py").is_file():
        ap.error(f"--compare {args.compare}: not a tree with edgemoe/ in it")
    if args.profile_base and args.compare is None:
        ap.error("--profile-base profiles the --compare tree: give --compare DIR")
    if args.llama_gguf is not None and not Path(args.llama_gguf).is_file():
        ap.error(f"--llama-gguf {args.llama_gguf}: no such file")
    if args.seconds > 0 and not args.py_spy:
        ap.error("py-spy not found: pip install py-spy, or pass --py-spy PATH (or --seconds 0)")
    here = Path(__file__).resolve().parents[2]
    loads = os.getloadavg()
    comparisons = [compare(here, args.compare.resolve(), model, th, tk, args.repeats)
                   for tk in tokens for th in threads] if args.compare else []
    llama = [against_llama(here, model, str(Path(args.llama_gguf).resolve()), args.llama_python, th, tk, args.repeats)
             for tk in tokens for th in threads] if args.llama_gguf else []
    trees = [here] + ([args.compare.resolve()] if args.profile_base else [])
    profiles = [profile(tree, model, th, tk, args.seconds, args.rate, args.py_spy)
                for tk in tokens for th in threads for tree in trees] if args.seconds > 0 else []
    command = "python -m edgemoe_lab.experiments.prefill_profile " + " ".join(argv)
    base = str(args.compare.resolve()) if args.compare else None
    args.out.write_text(render(profiles, comparisons, command, args.model, base, loads, llama, args.llama_gguf))
    args.out.with_suffix(".json").write_text(json.dumps({"profiles": profiles, "comparisons": comparisons,
                                                         "llama": llama}, indent=1))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
