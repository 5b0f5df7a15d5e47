"""Benchmark the quantized expert kernels.

For each expert format: GB/s of weight bytes through one expert call (gate/up and down)
at batch 1 and batch 32, on a Mixtral-sized expert (hidden 4096, inter 14336) and a
~1B-model expert (hidden 2048, inter 5632), with torch's own int4pack kernel and bf16 as
baselines. Weights are memory-cold: calls rotate over enough copies of the expert to
overflow the last-level cache, as in decode where other experts run in between.

Then the question the low bit widths must answer: per token, is reading a 2/3-bit expert
from disk (O_DIRECT, one thread) and computing it cheaper than reading and computing the
same expert at 4 bits? And on a cache hit, how does its compute compare with 4-bit?

Then every instruction-set variant of the C kernels (generic C, AVX2, AVX-VNNI, AVX-512
VNNI, as many as this CPU runs) with int8 and int16 activations (MXFP4: int8 and fp32),
per format at batch 1 and 32, next to the DRAM read bandwidth measured in the same
rounds (the physical limit of a batch-1 call on cold weights).

Finally the batch sizes where dequantize-then-matmul overtakes the packed kernels, and
(--sections accuracy) the accuracy cost of int8 activations on the bundled model:
held-out perplexity, logits against the int16 kernel and greedy tokens.

All timings are medians over rounds that interleave the variants, so contention from
other work on a shared machine hits every variant alike; compare ratios within one run.

    python -m edgemoe_lab.experiments.quant_kernels --out edgemoe_lab/results/quant_kernels.md
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import tempfile
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgemoe_lab import paths  # noqa: E402
from edgemoe_lab.peer.machine import cpu_model  # noqa: E402
from edgemoe.quant import kernels as K  # noqa: E402
from edgemoe.quant import mxfp4 as MX  # noqa: E402
from edgemoe.quant import native as N  # noqa: E402
from edgemoe.quant.formats import get_format  # noqa: E402

FORMATS = ["bf16", "int8", "int4", "int4-asym", "int3", "int3-asym", "int2", "int2-asym", "mxfp4"]
ISA_FORMATS = ["int8", "int4", "int4-asym", "int3", "int3-asym", "int2", "int2-asym", "mxfp4"]
SECTIONS = ("kernels", "isa", "disk", "crossover", "accuracy")
SHAPES = {"mixtral": (4096, 14336), "1b": (2048, 5632)}
COLD_BYTES = 160 << 20  # rotate over copies until this many bytes (5x the 32 MiB L3)
ALIGN = 4096
# What the kernel tables time: wall clock by default; with --cpu-time, the calling
# thread's CPU time on one thread, which time spent descheduled by other work does not count.
CLOCK = time.perf_counter
DISK_GBS = 1.66  # one-thread O_DIRECT read rate of this machine's disk (DEVELOPERS.md)


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


# ----------------------------------------------------------------------------- experts


def random_expert(hidden: int, inter: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g) * 0.02 for s in ((inter, hidden), (inter, hidden), (hidden, inter)))


def slab_layout(fmt, hidden: int, inter: int):
    """Offsets of the encoded tensors in one blob, 64-byte aligned, as the store lays them."""
    specs, offs, off = fmt.layout(hidden, inter), [], 0
    for s in specs:
        off = -(-off // 64) * 64
        offs.append(off)
        off += s.nbytes
    return specs, offs, -(-off // ALIGN) * ALIGN


def to_slab(fmt, parts, hidden, inter, slab=None):
    specs, offs, size = slab_layout(fmt, hidden, inter)
    if slab is None:
        slab = torch.zeros(size, dtype=torch.uint8)
    for s, o in zip(specs, offs):
        slab[o : o + s.nbytes] = parts[s.name].contiguous().view(-1).view(torch.uint8)
    return slab


def views(fmt, slab, hidden, inter):
    specs, offs, _ = slab_layout(fmt, hidden, inter)
    return {s.name: slab[o : o + s.nbytes].view(s.dtype).view(s.shape) for s, o in zip(specs, offs)}


class Int4PackExpert:
    """Baseline: the same expert computed by torch's _weight_int4pack_mm_for_cpu (group 64,
    CPU-specific packed layout)."""

    def __init__(self, gate, up, down, group=64):
        self.group = group
        self.w13 = self._pack(torch.cat([gate, up]), group)
        self.w2 = self._pack(down, group)
        self.nbytes = sum(t.nbytes for t in self.w13 + self.w2)

    @staticmethod
    def _pack(w, group):
        n, k = w.shape
        wg = w.float().view(n, k // group, group)
        lo, hi = wg.amin(-1), wg.amax(-1)
        s = ((hi - lo) / 15).clamp_min(1e-8)
        q = torch.round((wg - lo.unsqueeze(-1)) / s.unsqueeze(-1)).clamp(0, 15).to(torch.int32).view(n, k)
        zero = lo + 8 * s  # torch's int4pack computes (q - 8) * scale + zero
        sz = torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous().bfloat16()  # (k/G, n, 2)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz

    def __call__(self, x):
        h = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.w13[0], self.group, self.w13[1])
        g, u = h.chunk(2, dim=-1)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(F.silu(g) * u, self.w2[0], self.group, self.w2[1])


def build_variants(hidden, inter, formats):
    """name -> (expert copies, weight bytes per expert, their slabs, hidden)."""
    w = random_expert(hidden, inter)
    out = {}
    for name in formats:
        fmt = get_format(name)
        slab = to_slab(fmt, fmt.encode(*w), hidden, inter)
        copies = max(1, -(-COLD_BYTES // slab.numel()))
        slabs = [slab] + [slab.clone() for _ in range(copies - 1)]
        experts = [fmt.expert(views(fmt, s, hidden, inter), "silu", torch.bfloat16) for s in slabs]
        out[name] = (experts, experts[0].nbytes, slabs, hidden)
    base = Int4PackExpert(*w)
    copies = max(1, -(-COLD_BYTES // base.nbytes))
    out["torch-int4pack"] = ([base] + [Int4PackExpert(*w) for _ in range(copies - 1)], base.nbytes, None, hidden)
    return out


def time_experts(variants: dict, batch: int, rounds: int) -> dict[str, tuple[float, float]]:
    """(median, best) seconds per expert call, rounds interleaved across variants."""
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (experts, _, _, hidden) in variants.items():
            x = torch.randn(batch, hidden).bfloat16()
            for e in experts:
                t = CLOCK()
                e(x)
                times[name].append(CLOCK() - t)
    return {n: (statistics.median(t), min(t)) for n, t in times.items()}


# ----------------------------------------------------------------------------- disk


def aligned_buffer(nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    buf = mmap.mmap(-1, nbytes)  # anonymous, page aligned: what O_DIRECT needs
    return buf, torch.frombuffer(buf, dtype=torch.uint8)


def read_direct(path: Path, buf: mmap.mmap, nbytes: int, chunk: int = 4 << 20) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        mv = memoryview(buf)
        off = 0
        while off < nbytes:
            n = min(chunk, nbytes - off)
            got = os.preadv(fd, [mv[off : off + n]], off)
            if got != n:
                raise OSError(f"short read from {path}: {got} of {n} bytes at {off}")
            off += n
    finally:
        os.close(fd)


def disk_vs_compute(hidden, inter, formats, workdir: Path, rounds: int) -> dict:
    """Per token: O_DIRECT read of the expert blob + batch-1 compute from the read slab."""
    workdir.mkdir(parents=True, exist_ok=True)
    w = random_expert(hidden, inter, seed=1)
    items = {}
    for name in formats:
        fmt = get_format(name)
        slab = to_slab(fmt, fmt.encode(*w), hidden, inter)
        path = workdir / f"expert-{name}.bin"
        with open(path, "wb") as f:
            f.write(slab.numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())  # no write-back left to compete with the timed reads
        buf, t = aligned_buffer(slab.numel())
        items[name] = (fmt, path, slab.numel(), buf, t)
    x = torch.randn(1, hidden).bfloat16()
    res = {n: {"read": [], "compute": [], "total": []} for n in formats}
    names = list(items)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate: nobody always goes first
            fmt, path, size, buf, t = items[name]
            t0 = time.perf_counter()
            read_direct(path, buf, size)
            t1 = time.perf_counter()
            fmt.expert(views(fmt, t, hidden, inter), "silu", torch.bfloat16)(x)
            t2 = time.perf_counter()
            res[name]["read"].append(t1 - t0)
            res[name]["compute"].append(t2 - t1)
            res[name]["total"].append(t2 - t0)
    for name, (_, path, size, _, _) in items.items():
        res[name]["bytes"] = size
        path.unlink()
    return res


# ----------------------------------------------------------------------------- crossover


# Dispatch limits that force one path:
# (PACKED_MAX_BATCH, PACKED_MAX_BATCH_BF16_CPU, PACKED_MAX_BATCH_BF16_CPU_INT16,
#  INT8_NATIVE_MAX_BATCH, INT8PACK_MAX_BATCH, INT8PACK_PREFERRED, C kernel on, activations)
BIG = 1 << 30
PATHS = {
    "packed C int8": (BIG, BIG, BIG, BIG, 0, False, True, "int8"),
    "packed C int16": (BIG, BIG, BIG, BIG, 0, False, True, "int16"),
    "torch int8pack": (0, 0, 0, 0, BIG, True, True, None),
    "dequant+matmul": (0, 0, 0, 0, 0, False, True, None),
}
LIMITS = ("PACKED_MAX_BATCH", "PACKED_MAX_BATCH_BF16_CPU", "PACKED_MAX_BATCH_BF16_CPU_INT16", "INT8_NATIVE_MAX_BATCH",
          "INT8PACK_MAX_BATCH", "INT8PACK_PREFERRED")


@contextlib.contextmanager
def forced(path: str, isa: str | None = None):
    """Every expert call on one kernel path (PATHS), optionally on one instruction-set
    variant; MXFP4 follows the activations too ("int16" meaning its fp32 path)."""
    spec = PATHS[path]
    saved = [getattr(K, n) for n in LIMITS]
    for n, v in zip(LIMITS, spec):
        setattr(K, n, v)
    K.use_native(spec[6])
    prev, prev_mx = K.ACTIVATIONS, MX.ACTIVATIONS
    if spec[7]:
        K.set_activations(spec[7])
        MX.set_activations("int8" if spec[7] == "int8" else "fp32")
    if isa:
        N.set_isa(isa)
    try:
        yield
    finally:
        for n, v in zip(LIMITS, saved):
            setattr(K, n, v)
        K.use_native(True)
        K.set_activations(prev)
        MX.set_activations(prev_mx)
        if isa:
            N.set_isa(None)


def crossover(hidden, inter, batches, rounds) -> list[tuple]:
    """Each kernel path for one expert call, per batch size."""
    w = random_expert(hidden, inter, seed=2)
    rows = []
    for name in ("int4", "int2", "int8"):
        fmt = get_format(name)
        e = fmt.expert(fmt.encode(*w), "silu", torch.bfloat16)
        paths = [p for p in PATHS if name == "int8" or p != "torch int8pack"]
        for b in batches:
            x = torch.randn(b, hidden).bfloat16()
            times = {p: [] for p in paths}
            for _ in range(rounds):
                for p in paths:
                    with forced(p):
                        t = CLOCK()
                        e(x)
                        times[p].append(CLOCK() - t)
            rows.append((name, b, {p: median_ms(t) for p, t in times.items()}))
    return rows


# ----------------------------------------------------------------------------- ISA paths


class ReadBuffer:
    """DRAM read bandwidth with the kernels' threads: em_read over a buffer far larger than
    the last-level cache (the physical limit of a batch-1 call on cold weights)."""

    def __init__(self, nbytes: int = 512 << 20):
        self.buf = torch.ones(nbytes, dtype=torch.uint8)  # touched: no page faults while timed
        self.times: list[float] = []

    def measure(self, threads: int) -> None:
        lib = N.get()
        t = CLOCK()  # the kernels' clock: with --cpu-time the read runs on the calling thread too
        lib.em_read(self.buf.data_ptr(), self.buf.numel(), threads)
        self.times.append(CLOCK() - t)

    def gbs(self) -> tuple[float, float]:
        return self.buf.numel() / statistics.median(self.times) / 1e9, self.buf.numel() / min(self.times) / 1e9


def isa_combos() -> list[tuple[str, str]]:
    """(variant, activations) for every variant this CPU runs ("int16" is MXFP4's fp32)."""
    return [(isa, act) for isa in N.supported_isas() for act in ("int8", "int16")]


def time_isa_paths(variants: dict, batch: int, rounds: int, threads: int, reader: ReadBuffer,
                   skip_generic: bool) -> dict:
    """(format, isa, act) -> (median, best) seconds per expert call on the packed kernels,
    rounds interleaved across every combination; one DRAM read per round in between."""
    combos = [(name, isa, act) for name in ISA_FORMATS if name in variants for isa, act in isa_combos()
              if not (skip_generic and isa == "generic")]
    times = {c: [] for c in combos}
    for _ in range(rounds):
        reader.measure(threads)
        for c in combos:
            name, isa, act = c
            experts, _, _, hidden = variants[name]
            x = torch.randn(batch, hidden).bfloat16()
            with forced("packed C " + act, isa):
                for e in experts[: (len(experts) if batch == 1 else 2)]:
                    t = CLOCK()
                    e(x)
                    times[c].append(CLOCK() - t)
    return {c: (statistics.median(t), min(t)) for c, t in times.items()}


def isa_table(variants: dict, hidden: int, inter: int, args, emit) -> None:
    reader = ReadBuffer()
    t1 = time_isa_paths(variants, 1, args.rounds, args.threads, reader, skip_generic=False)
    t32 = time_isa_paths(variants, 32, max(2, args.rounds // 2), args.threads, reader, skip_generic=True)
    med, best = reader.gbs()
    emit(f"DRAM read bandwidth, {args.threads} thread(s), em_read over 512 MiB between the rounds of this "
         f"table, same clock: **{med:.1f} GB/s** median ({best:.1f} best). A batch-1 call on cold weights cannot "
         f"beat it for long.")
    emit()
    emit("Packed C kernels forced at both batches; int16 = the kernels before the int8 path (MXFP4: fp32 "
         "activations). Speed-up = int16 time / int8 time on the same variant. The generic variant is left out "
         "at batch 32 (seconds per call).")
    emit()
    emit("| format | variant | activations | batch 1 ms | batch 1 GB/s | speed-up b1 | batch 32 ms | batch 32 GB/s "
         "| speed-up b32 |")
    emit("|---|---|---|---|---|---|---|---|---|")
    for name in ISA_FORMATS:
        if name not in variants:
            continue
        nbytes = variants[name][1]
        for isa, act in isa_combos():
            m1, b1 = t1[(name, isa, act)]
            r1 = t1[(name, isa, "int16")][0] / m1
            cell32 = "- | - | -"
            if (name, isa, act) in t32:
                m32, b32 = t32[(name, isa, act)]
                r32 = t32[(name, isa, "int16")][0] / m32
                cell32 = f"{m32 * 1e3:.1f} | {nbytes / m32 / 1e9:.2f} ({nbytes / b32 / 1e9:.2f}) | {r32:.2f}"
            label = act if name != "mxfp4" else {"int16": "fp32", "int8": "int8"}[act]
            emit(f"| {name} | {isa} | {label} | {m1 * 1e3:.2f} | {nbytes / m1 / 1e9:.1f} ({nbytes / b1 / 1e9:.1f}) "
                 f"| {r1:.2f} | {cell32} |")
    emit()


# ----------------------------------------------------------------------------- accuracy


def accuracy(args, emit) -> None:
    """The accuracy cost of int8 activations on the bundled model: each expert format
    converted, then held-out perplexity, logits and greedy tokens with int8 vs int16
    activations (MXFP4: int8 vs fp32), packed kernels at every batch (what decode runs)."""
    from edgemoe import assets
    from edgemoe.api import load
    from edgemoe.evaluate import eval_tokens, perplexity, read_text
    from edgemoe.store.convert import convert

    formats = ["int8", "int4", "int4-asym", "int3", "int3-asym", "int2", "int2-asym", "mxfp4"]
    text = read_text(assets.HELDOUT_TEXT, "held-out text")
    prompts = ["def fibonacci(n):", "class Stack:", "import os\n\ndef main():", "    for i in range("]
    emit("## Accuracy of int8 activations (bundled model)")
    emit()
    emit(f"Bundled model ({assets.MODEL_DIR.name}: hidden 128, 8 layers x 8 experts, top-2) converted per format "
         f"(`edgemoe.store.convert`, float32 resident weights), evaluated on `{assets.HELDOUT_TEXT.name}` in "
         f"float32 with the packed C kernels forced at every batch, so every token's expert matmuls run the "
         f"path under test, as in decode. Logits: the first {args.logit_windows} windows of 256 tokens; KL is "
         f"mean KL(p_int16 || p_int8) per token in nats; top-1 = share of positions whose argmax agrees. Greedy: "
         f"{len(prompts)} prompts x 64 tokens with the default dispatch (`Engine.generate`, temperature 0); "
         f"'same' counts prompts whose tokens are identical. The last column puts the logits difference in "
         f"scale: the int16 kernel's logits against those of the unquantized (fp32) experts, i.e. the error of "
         f"the weight quantization itself.")
    emit()
    emit("| format | ppl int16 | ppl int8 | ppl change | logits rel. RMS diff | max abs diff | top-1 agree | KL "
         "| greedy same | first divergence (token index) | weights: int16 vs fp32 experts, rel. RMS |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|")
    work = Path(tempfile.mkdtemp(prefix="qk-acc-", dir=args.workdir if args.workdir.exists() else None))
    try:
        convert(assets.MODEL_DIR, work / "fp32", fmt="fp32", dtype="float32", force=True)
        eng = load(work / "fp32", dtype="float32", threads=args.threads)
        with eng:
            ctx = eng.model.args.max_position_embeddings
            ids = eval_tokens(eng.tokenizer, text, ctx, args.acc_tokens, str(assets.HELDOUT_TEXT))
            ref = perplexity(eng.model, ids, ctx, batch=8)
            win = torch.tensor(ids[: args.logit_windows * ctx]).view(args.logit_windows, ctx)
            with torch.inference_mode():
                l32 = eng.model(win).float()
        emit(f"| fp32 (experts not quantized) | {ref['ppl']:.3f} | | | | | | | | | |")
        for name in formats:
            out = work / name
            convert(assets.MODEL_DIR, out, fmt=name, dtype="float32", force=True)
            res = {}
            for act in ("int16", "int8"):
                with forced("packed C " + act):
                    eng = load(out, dtype="float32", threads=args.threads)
                    with eng:
                        ctx = eng.model.args.max_position_embeddings
                        ids = eval_tokens(eng.tokenizer, text, ctx, args.acc_tokens, str(assets.HELDOUT_TEXT))
                        ppl = perplexity(eng.model, ids, ctx, batch=8)["ppl"]
                        win = torch.tensor(ids[: args.logit_windows * ctx]).view(args.logit_windows, ctx)
                        with torch.inference_mode():
                            logits = eng.model(win).float()
                # greedy with the default dispatch, only the activation path switched
                prev, prev_mx = K.set_activations(act), MX.set_activations("int8" if act == "int8" else "fp32")
                try:
                    eng = load(out, dtype="float32", threads=args.threads)
                    with eng:
                        toks = [eng.generate(p, max_tokens=64, temperature=0).token_ids for p in prompts]
                finally:
                    K.set_activations(prev)
                    MX.set_activations(prev_mx)
                res[act] = (ppl, logits, toks)
            (p16, l16, g16), (p8, l8, g8) = res["int16"], res["int8"]
            d = l8 - l16
            rel = float(d.norm() / l16.norm())
            lp16, lp8 = l16.log_softmax(-1), l8.log_softmax(-1)
            kl = float((lp16.exp() * (lp16 - lp8)).sum(-1).mean())
            top1 = float((l16.argmax(-1) == l8.argmax(-1)).float().mean())
            same = sum(a == b for a, b in zip(g16, g8))
            firsts = [next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), None) for a, b in zip(g16, g8)]
            div = ", ".join("-" if f is None else str(f) for f in firsts)
            wq = float((l16 - l32).norm() / l32.norm())
            emit(f"| {name} | {p16:.3f} | {p8:.3f} | {100 * (p8 / p16 - 1):+.2f}% | {rel:.2e} | {float(d.abs().max()):.3f} "
                 f"| {100 * top1:.2f}% | {kl:.2e} | {same}/{len(prompts)} | {div} | {wq:.2e} |")
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    emit()
    emit(f"Tokens evaluated: {ref['tokens']:,} ({ref['tokens'] // ctx} windows of {ctx}).")
    emit()


# ----------------------------------------------------------------------------- main


def disk_table(args, shape: str, hidden: int, inter: int, emit) -> None:
    emit(f"## Per token from disk: O_DIRECT read + batch-1 compute ({shape} expert)")
    emit()
    emit("Read with O_DIRECT in 4 MiB chunks on one thread into a page-aligned slab, then the expert is "
         "built from zero-copy views of the slab and called once (batch 1, bf16).")
    emit()
    emit(f"The measured reads go through a virtual disk whose host may cache recently written files, so the "
         f"table also models the read at the {DISK_GBS} GB/s one-thread O_DIRECT rate measured for this machine "
         f"(DEVELOPERS.md).")
    emit()
    emit("| format | MB read | read ms | read GB/s | compute ms | total ms | total vs int4 | compute vs int4 "
         "| modeled total ms | modeled vs int4 |")
    emit("|---|---|---|---|---|---|---|---|---|---|")
    disk_formats = ["int4", "int4-asym", "int3", "int3-asym", "int2", "int2-asym"]
    try:
        res = disk_vs_compute(hidden, inter, disk_formats, args.workdir, args.rounds)
        ref = {k: median_ms(res["int4"][k]) for k in ("read", "compute", "total")}
        model_ref = res["int4"]["bytes"] / DISK_GBS / 1e6 + ref["compute"]
        for name in disk_formats:
            r = res[name]
            rd, cp, tot = median_ms(r["read"]), median_ms(r["compute"]), median_ms(r["total"])
            model = r["bytes"] / DISK_GBS / 1e6 + cp
            emit(f"| {name} | {r['bytes'] / 1e6:.1f} | {rd:.1f} | {r['bytes'] / rd / 1e6:.2f} | {cp:.2f} | {tot:.1f} "
                 f"| {tot / ref['total']:.2f} | {cp / ref['compute']:.2f} | {model:.1f} | {model / model_ref:.2f} |")
    except OSError as e:
        emit(f"(skipped: {e})")
    emit()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default="mixtral,1b")
    ap.add_argument("--workdir", type=Path, default=paths.WORK)
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, timed by its CPU time (robust on a shared machine); skips the disk table")
    ap.add_argument("--sections", default="kernels,isa,disk,crossover",
                    help=f"comma-separated subset of {','.join(SECTIONS)} (accuracy: off by default, minutes)")
    ap.add_argument("--acc-tokens", type=int, default=None,
                    help="accuracy: held-out tokens to evaluate (default: all, 83k)")
    ap.add_argument("--logit-windows", type=int, default=16, help="accuracy: windows of 256 tokens for the logits")
    args = ap.parse_args(argv)
    sections = [x for x in args.sections.split(",") if x]
    for sec in sections:
        if sec not in SECTIONS:
            ap.error(f"unknown section {sec!r} (known: {', '.join(SECTIONS)})")
    global CLOCK
    if args.cpu_time:
        args.threads, CLOCK = 1, time.thread_time
    torch.set_num_threads(args.threads)

    lines = []

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    load0 = os.getloadavg()
    emit("# Quantized expert kernels")
    emit()
    emit(f"Command: `python -m edgemoe_lab.experiments.quant_kernels {' '.join(argv if argv is not None else sys.argv[1:])}`")
    emit()
    emit(f"- CPU: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
         f"(ATen capability {torch.backends.cpu.get_cpu_capability()}), {args.threads} thread(s)")
    emit(f"- timed by: {'CPU time of the one calling thread' if args.cpu_time else 'wall clock'}")
    if K.native_available():
        emit(f"- edgemoe C kernel: variants built {', '.join(n for n, _ in N.variants_for())}; this CPU runs "
             f"{', '.join(N.supported_isas())}; dispatch picks **{N.isa()}**; activations {K.ACTIVATIONS} "
             f"(MXFP4 {MX.ACTIVATIONS})")
    else:
        emit(f"- edgemoe C kernel: unavailable: {K.native_error()}")
    flags = [f for f in N.cpu_id().split() if f.startswith(("avx", "amx", "fma", "f16c", "asimd", "sve"))]
    emit(f"- CPU flags (SIMD): {' '.join(flags)}")
    emit(f"- load average at start: {load0[0]:.2f} (other work on the machine inflates every number alike)")
    emit(f"- medians of {args.rounds} interleaved rounds; memory-cold: each round calls every copy "
         f"of the expert, copies sized to exceed {COLD_BYTES >> 20} MiB")
    emit()

    shapes = [s for s in args.shapes.split(",") if s]
    for shape in shapes if ("kernels" in sections or "isa" in sections) else []:
        hidden, inter = SHAPES[shape]
        variants = build_variants(hidden, inter, FORMATS if "kernels" in sections else ISA_FORMATS)
        if "isa" in sections and K.native_available():
            emit(f"## Instruction-set variants and activation paths, expert {shape}: hidden {hidden}, inter {inter}")
            emit()
            isa_table(variants, hidden, inter, args, emit)
        if "kernels" not in sections:
            del variants
            continue
        emit(f"## Expert {shape}: hidden {hidden}, inter {inter} (default dispatch)")
        emit()
        emit("GB/s = weight bytes of the expert / time of one call (median; best call in brackets).")
        emit()
        emit("| format | bits/weight | MiB | batch 1 ms | batch 1 GB/s | batch 32 ms | batch 32 GB/s "
             "| vs int4, batch 1 | vs int4, batch 32 |")
        emit("|---|---|---|---|---|---|---|---|---|")
        t1 = time_experts(variants, 1, args.rounds)
        t32 = time_experts(variants, 32, max(2, args.rounds // 2))
        for name, (_, nbytes, _, _) in variants.items():
            bpw = 8 * nbytes / (3 * hidden * inter)
            (m1, b1), (m32, b32) = t1[name], t32[name]
            emit(f"| {name} | {bpw:.3f} | {nbytes / 2**20:.1f} | {m1 * 1e3:.2f} | {nbytes / m1 / 1e9:.1f} "
                 f"({nbytes / b1 / 1e9:.1f}) | {m32 * 1e3:.1f} | {nbytes / m32 / 1e9:.2f} ({nbytes / b32 / 1e9:.2f}) "
                 f"| {m1 / t1['int4'][0]:.2f} | {m32 / t32['int4'][0]:.2f} |")
        emit()
        del variants

    hidden, inter = SHAPES[shapes[0]]
    if not args.cpu_time and "disk" in sections:
        disk_table(args, shapes[0], hidden, inter, emit)

    if "crossover" in sections:
        hidden, inter = SHAPES[shapes[-1]]
        batches = [1, 8, 16, 32, 64, 128, 256]
        emit(f"## Packed kernel vs dequantize + matmul ({shapes[-1]} expert, one call)")
        emit()
        int8_via = ("torch `_weight_int8pack_mm` up to batch " + str(K.INT8PACK_MAX_BATCH_AVX512)
                    if K.INT8PACK_PREFERRED else "the packed C kernel")
        emit(f"Dispatch on this CPU: packed C kernel (2/3/4-bit; int8 weights: {int8_via}) up to batch "
             f"{K.packed_max_batch()}, then dequantize + {str(K.MATMUL_DTYPE).replace('torch.', '')} matmul; "
             f"activations {K.ACTIVATIONS}.")
        emit()
        emit("| format | batch | " + " | ".join(f"{p} ms" for p in PATHS) + " | fastest |")
        emit("|---|---|" + "---|" * len(PATHS) + "---|")
        for name, b, t in crossover(hidden, inter, batches, max(2, args.rounds // 2)):
            cells = " | ".join(f"{t[p]:.2f}" if p in t else "-" for p in PATHS)
            emit(f"| {name} | {b} | {cells} | {min(t, key=t.get)} |")
        emit()
    if "accuracy" in sections:
        accuracy(args, emit)
    load1 = os.getloadavg()
    emit(f"Load average at end: {load1[0]:.2f}.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
