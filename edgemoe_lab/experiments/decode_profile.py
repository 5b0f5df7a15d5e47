"""Where one decode step's time goes (issue 15, section 5): kernels vs everything else.

A child process loads the model, prefills and warms up, then decodes greedily (EOS
ignored) for a fixed time. Meanwhile py-spy (`pip install py-spy`; a sampling profiler
that reads the process from outside, so the run is not slowed by instrumentation) samples
the child's main thread with native frames. Each sample is classified by its innermost
frame:

- matmul kernels: edgemoe's C kernels (quant/csrc, rowmm), torch's/MKL's gemm and gemv;
- elementwise/reduction kernels: torch's vectorized loops (norms, RoPE, softmax, top-k);
- memory copies: libc mem* (unsymbolized libc addresses land here too);
- thread waits: OpenMP barriers and spins (the main thread waiting for its workers);
- Python interpreter: a Python frame is innermost (the interpreter runs edgemoe's or
  torch.nn's Python code);
- torch dispatch and bookkeeping: torch's C++ that is not a kernel (argument parsing,
  operator dispatch, tensor construction and teardown, TensorIterator set-up);
- allocation: malloc/free and tensor storage.

"Non-kernel time" is the sum of the last three: what a step costs beyond its kernels. For
it, the table also names the innermost edgemoe function the samples fall under.

    python -m edgemoe_lab.experiments.decode_profile --model bundled --threads 1 \\
        --model /path/to/converted-bench-model --threads 1 -o edgemoe_lab/results/decode_profile.md

(`--model`/`--threads` pairs repeat: one profile per pair.)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgemoe_lab.peer.machine import cpu_model

PROMPT = "def fibonacci(n):\n    "

KERNEL_CLASSES = [
    ("matmul kernels", r"row8?_b\d|rowmm|gemv|gemm|dot_with|_qmm|em_\w+_(qmm|mx|expert)|dnnl|mkl_blas|brgemm|jit_"),
    ("elementwise/reduction kernels",
     r"VectorizedLoop|vectorized_loop|cpu_kernel|basic_loop|reduce|softmax|Vectorized<|topk|sort_|index_select"
     r"|embedding|cat_serial|copy_kernel|mul_kernel|add_kernel|rsqrt|silu|sigmoid|exp_kernel|flash_attention"),
    ("memory copies", r"^(__)?mem(cpy|move|set)|^0x[0-9a-f]+$"),
    ("thread waits", r"gomp|futex|sched_yield|pthread_cond|barrier|^omp_"),
    ("allocation", r"malloc|^free$|^cfree|empty_generic|empty_cpu|TensorImpl::TensorImpl|~TensorImpl|StorageImpl"
                   r"|raw_deallocate|posix_memalign|aligned_alloc"),
]
NON_KERNEL = ("Python interpreter", "torch dispatch and bookkeeping", "allocation")


def classify(frame: str) -> str:
    """The class of a sample from its innermost frame, "name (file:line)" or "symbol (library)"."""
    if re.search(r"\.py:\d+\)$", frame) or "libpython" in frame:
        return "Python interpreter"
    symbol, _, lib = frame.rpartition(" (")
    if "libgomp" in lib:  # unsymbolized libgomp addresses are its barrier and spin loops
        return "thread waits"
    for name, pattern in KERNEL_CLASSES:
        if re.search(pattern, symbol):
            return name
    if "libc.so" in lib and symbol.startswith("0x"):
        return "memory copies"
    if re.search(r"libtorch|libc10", lib):
        return "torch dispatch and bookkeeping"
    return "other native"


def analyse(raw_path: Path) -> dict:
    """Fractions of main-thread samples per class, and non-kernel samples per edgemoe function."""
    total = 0
    classes: collections.Counter = collections.Counter()
    leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    owners: collections.Counter = collections.Counter()
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames[0].endswith("MainThread"):
            continue
        n = int(count)
        total += n
        c = classify(frames[-1])
        classes[c] += n
        leaves[c][frames[-1][:90]] += n
        if c in NON_KERNEL:
            ours = [f for f in frames if "edgemoe/" in f]
            owners[re.sub(r":\d+\)$", ")", ours[-1]) if ours else "(outside edgemoe)"] += n
    if not total:
        raise SystemExit(f"{raw_path}: no main-thread samples")
    return {
        "samples": total,
        "classes": {c: v / total for c, v in classes.most_common()},
        "top": {c: [(leaf, v / total) for leaf, v in leaves[c].most_common(3)] for c in classes},
        "non_kernel": sum(classes[c] for c in NON_KERNEL) / total,
        "non_kernel_by_function": [(f, v / total) for f, v in owners.most_common(12)],
    }


def child(model: str, threads: int, seconds: float, ready: str, out: str) -> None:
    import edgemoe

    engine = edgemoe.load(None if model == "bundled" else model, threads=threads)
    engine.generate(PROMPT, max_tokens=16, ignore_eos=True)  # warm-up: kernels built, caches filled
    Path(ready).write_text(str(os.getpid()))
    t0, tokens = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        engine.generate(PROMPT, max_tokens=64, ignore_eos=True)
        tokens += 64
    Path(out).write_text(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t0}))


def profile(model: str, threads: int, seconds: float, rate: int, py_spy: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ready, out, raw = Path(tmp, "ready"), Path(tmp, "run.json"), Path(tmp, "samples.raw")
        proc = subprocess.Popen([sys.executable, "-m", __spec__.name, "--child", model, str(threads), str(seconds + 10),
                                 str(ready), str(out)])
        while not ready.exists():
            if proc.poll() is not None:
                raise SystemExit(f"the decode child for {model} exited with {proc.returncode}")
            time.sleep(0.2)
        time.sleep(1.0)
        subprocess.run([py_spy, "record", "--pid", ready.read_text(), "--native", "--threads", "--rate", str(rate),
                        "--duration", str(int(seconds)), "--format", "raw", "-o", str(raw)],
                       check=True, capture_output=True)
        if proc.wait() != 0:
            raise SystemExit(f"the decode child for {model} exited with {proc.returncode}")
        run = json.loads(out.read_text())
        result = analyse(raw)
    result.update(model=model, threads=threads, tok_s=run["tokens"] / run["seconds"],
                  ms_per_token=1000 * run["seconds"] / run["tokens"])
    return result


def render(results: list[dict], command: str) -> str:
    from edgemoe.quant.native import cpu_id, isa

    load = os.getloadavg()
    lines = [
        "# Where a decode step's time goes: kernels vs the rest",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, edgemoe's kernels: {isa() or 'torch fallback'}; load average at the end "
        f"{load[0]:.1f} (a shared machine: absolute speeds are noisy, the shares of one run are not much affected "
        "on one thread).",
        "",
        f"CPU {cpu_id()}",
        "",
        "Method: see the module docstring (py-spy samples of the main thread, classified by the innermost frame).",
        "",
    ]
    for r in results:
        lines += [
            f"## {r['model']}, {r['threads']} thread(s): {r['tok_s']:.1f} tok/s ({r['ms_per_token']:.2f} ms per token), "
            f"{r['samples']} samples",
            "",
            f"**Non-kernel time: {100 * r['non_kernel']:.1f}%** of the main thread's samples "
            f"({r['non_kernel'] * r['ms_per_token']:.2f} ms per token).",
            "",
            "| class | share | top frames |",
            "|---|---|---|",
        ]
        for c, share in r["classes"].items():
            top = "; ".join(f"`{leaf}` {100 * v:.1f}%" for leaf, v in r["top"][c])
            lines.append(f"| {c} | {100 * share:.1f}% | {top} |")
        lines += ["", "Non-kernel samples by the innermost edgemoe function they fall under:", "",
                  "| function | share of all samples |", "|---|---|"]
        lines += [f"| `{f}` | {100 * v:.1f}% |" for f, v in r["non_kernel_by_function"]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], int(argv[2]), float(argv[3]), argv[4], argv[5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="'bundled' or a model directory (repeatable)")
    ap.add_argument("--threads", action="append", type=int, required=True, help="threads for the matching --model")
    ap.add_argument("--seconds", type=float, default=20.0, help="profiled decode time per model")
    ap.add_argument("--rate", type=int, default=200, help="samples per second")
    ap.add_argument("--py-spy", default=shutil.which("py-spy"), help="the py-spy executable")
    ap.add_argument("-o", "--out", type=Path, required=True, help="results markdown (a .json is written beside it)")
    args = ap.parse_args(argv)
    if len(args.model) != len(args.threads):
        ap.error("give one --threads per --model")
    if not args.py_spy:
        ap.error("py-spy not found: pip install py-spy, or pass --py-spy PATH")
    results = [profile(m, t, args.seconds, args.rate, args.py_spy) for m, t in zip(args.model, args.threads)]
    command = "python -m edgemoe_lab.experiments.decode_profile " + " ".join(argv)
    args.out.write_text(render(results, command))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
