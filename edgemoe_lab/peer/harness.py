"""One `edgemoe bench` comparison from start to end: the model and its converted forms, the
peers, the reference run that fixes the token stream, every engine at every budget, and
the results. `edgemoe/cli/bench.py` parses and checks the flags, then runs a `Bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import edgemoe
from edgemoe.errors import InvalidArgument
from edgemoe.store.names import MANIFEST_NAME, RESIDENT_NAME, STORE_NAME
from edgemoe.utils import format_bytes

from . import cgroup, machine, model, peers, report, runner
from . import configs as C
from .runner import Launch, child_script
from .write import write_results

DEFAULT_PROMPT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def norm(self):\n"
)
QTYPES = {4: "Q4_0", 8: "Q8_0"}  # edgemoe's expert bits -> the GGUF type at matching bits
MARGIN = 32 << 20  # kept free below the cgroup limit for what the overhead measurement misses


@dataclass
class _Runs:
    """What every run of a comparison shares, fixed before the first one."""
    stores: dict[str, Path]  # edgemoe's converted stores by kind (configs.STORE_KINDS)
    gguf: Path | None  # the file llama.cpp runs
    forced: list[int]  # the token stream every engine is fed
    trace: Path  # the reference run's routing trace (Belady replays it)
    overhead: int  # edgemoe's measured process overhead in bytes
    transformers_base: int | None  # transformers' interpreter overhead in bytes
    hf: Path  # the model directory (or the GGUF file given)
    size: int  # the quantized model size the budgets are fractions of


class Bench:
    """One comparison: `Bench(opts, argv).main(fractions, engines, configs)`."""

    def __init__(self, opts: argparse.Namespace, argv: list[str]):
        self.opts = opts
        self.argv = argv
        self.work = Path(opts.work).resolve()
        self.out = Path(opts.out).resolve()
        self.tmp = self.work / "tmp"
        self.peers_python = Path(opts.peers_python) if opts.peers_python else self.work / "peers" / "bin" / "python"
        self.threads = opts.threads or os.cpu_count() or 1
        self.notes: list[str] = []
        self.unavailable: dict[str, str] = {}
        self.gguf_source: Path | None = None  # --model FILE.gguf
        self.gguf_types = ""  # its expert tensor types, e.g. "Q4_K/Q6_K"

    def log(self, msg: str) -> None:
        if not self.opts.quiet:
            print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # -- preparation ------------------------------------------------------------------------------
    def model_dir(self) -> tuple[Path, str]:
        m = model.resolve_model(self.opts.model, self.work, self.log)
        if m.gguf:
            self.gguf_source, self.gguf_types = m.path, m.gguf_types
        return m.path, m.description

    def ensure_store(self, hf: Path, name: str, flags: list[str]) -> Path:
        return model.ensure_store(self.work, hf, name, flags, self.log)

    # -- the runs ---------------------------------------------------------------------------------
    def run_child(self, launch, limit: int | None) -> dict:
        return runner.run(launch, ctl=self.ctl, limit=limit, timeout_s=self.opts.timeout, tmp_root=self.tmp)

    def edgemoe_launch(self, store: Path, runtime: dict, memory: int | None, forced, record_trace=None):
        spec = {"model": str(store), "memory": memory, "runtime": runtime, "prompt_ids": self.prompt_ids,
                "forced_ids": forced, "max_tokens": self.opts.tokens, "threads": self.threads,
                "record_trace": str(record_trace) if record_trace else None}
        pkg_root = str(Path(edgemoe.__file__).resolve().parent.parent)  # the directory holding edgemoe
        env = {"PYTHONPATH": pkg_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        return Launch([sys.executable, child_script("edgemoe_run.py")], spec, env)

    def main(self, fractions: list[float], engines: list[str], cfgs: list[C.Config]) -> int:
        """The whole comparison, with the flags already checked (`check_options`): writes
        results.json, results.md and the plots to --out."""
        opts = self.opts
        self.work.mkdir(parents=True, exist_ok=True)
        t_start = time.time()
        meta: dict = {"command": "edgemoe bench " + shlex.join(self.argv), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                      "machine": machine.describe(), "loadavg_start": machine.loadavg()}
        self.setup_cgroups(meta)
        hf, quant, stores, label, edgemoe_size = self.prepare_model(meta, engines, cfgs)
        gguf = self.check_peers(meta, hf, cfgs)
        size = self.model_size(meta, hf, gguf, edgemoe_size, label)
        forced, trace, overhead, reserved = self.reference_run(meta, hf, quant, label)

        # Disk bandwidth.
        machine.drop_caches()
        bw = machine.disk_read_bandwidth(quant / STORE_NAME)
        meta["disk"] = bw
        self.log(f"disk: {format_bytes(bw['bytes_per_s'])}/s ({bw['mode']} reads of {format_bytes(bw['chunk_bytes'])})")

        transformers_base = None
        if transformers_included(cfgs) and "transformers" not in self.unavailable:
            transformers_base = self.transformers_baseline()
            meta["transformers_overhead_bytes"] = transformers_base

        adds = opts.limit_adds_overhead if opts.limit_adds_overhead is not None else opts.model == "bundled"
        self.adds_overhead = adds
        # Each engine's memory besides the model's bytes (added to its limit with
        # --limit-adds-overhead): for edgemoe its process overhead and its KV and workspace
        # reservations, for llama.cpp its peak RSS less the GGUF (which holds the same).
        self.overheads = {"edgemoe": overhead + reserved + MARGIN, "transformers": (transformers_base or 0) + MARGIN,
                          "llama.cpp": 64 << 20}  # replaced by the measurement of the first unlimited llama.cpp run
        meta["limit_adds_overhead"] = adds
        budgets: list[float | None] = ([] if opts.no_unlimited else [None]) + fractions
        labels = [report.budget_label(f) for f in budgets]
        run = _Runs(stores=stores, gguf=gguf, forced=forced, trace=trace, overhead=overhead,
                    transformers_base=transformers_base, hf=hf, size=size)
        rows = self.run_all(meta, cfgs, budgets, run)
        self.finish_meta(meta, rows, t_start)
        write_results(self.out, meta, rows, labels, fractions, size, bw, self.log)
        return 0

    def setup_cgroups(self, meta: dict) -> None:
        """The memory controller (`self.ctl`, None without one) and the page-cache drop."""
        if self.opts.no_cgroup:
            self.ctl, why = None, "disabled with --no-cgroup"
        else:
            self.ctl, why = cgroup.detect()
        if self.ctl is None:
            self.log(f"NO MEMORY LIMITS: {why}; every run is unconstrained")
            meta["cgroup"] = {"available": False, "reason": why}
        else:
            stale = cgroup.remove_stale(self.ctl)
            if stale:
                self.log(f"removed stale cgroups {stale}")
            meta["cgroup"] = {"available": True, "controller": self.ctl.describe()}
        meta["page_cache_drop"] = os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)

    def prepare_model(self, meta: dict, engines: list[str], cfgs: list[C.Config]):
        """The model and its converted forms: (model dir or GGUF file, the quantized store,
        every store by kind, the quantized store's label, its size in bytes)."""
        opts = self.opts
        hf, desc = self.model_dir()
        meta["model"] = desc
        meta["model_dir"] = str(hf)
        gguf_in = self.gguf_source is not None
        if gguf_in and engines == ["transformers"]:
            raise InvalidArgument(f"{hf}: transformers runs a Hugging Face directory, not a GGUF file; with a GGUF "
                                  "--model use --engines edgemoe,llama.cpp")
        if gguf_in and "transformers" in engines:
            self.unavailable["transformers"] = ("--model is a GGUF file; transformers runs a Hugging Face directory "
                                                "(give the checkpoint's directory to compare with it)")
        # Resident layers at the experts' bits, as the GGUF type quantizes attention (Q4_0: int4, Q8_0: int8).
        res_kind = opts.resident or ("int8" if opts.bits == 8 or (gguf_in and opts.bits is None) else "int4")
        meta["resident"] = res_kind
        resident = ["--resident", res_kind]
        tag = model.resident_tag(resident)  # "" for int8: the names of existing work directories
        if gguf_in and opts.bits is None:
            label = "gguf"  # the converter's default plan: the file's own precision
            quant = self.ensure_store(hf, f"edgemoe-gguf{tag}-{hf.stem}", resident)
        else:
            bits = opts.bits or 4
            label = f"int{bits}"
            quant = self.ensure_store(hf, f"edgemoe-int{bits}{tag}-{hf.name}", ["--bits", str(bits), *resident])
        stores = {"quant": quant}
        if any(c.store == "bf16" for c in cfgs):
            stores["bf16"] = self.ensure_store(hf, f"edgemoe-bf16-{hf.name}", ["--bits", "16"])
        for kind in C.PLAN_STORES:
            if opts.plan and any(c.store == kind for c in cfgs):
                stores[kind] = model.plan_store(self.work, hf, kind, Path(opts.plan), resident, self.log)
        man = json.loads((quant / MANIFEST_NAME).read_text())
        edgemoe_size = (quant / RESIDENT_NAME).stat().st_size + (quant / STORE_NAME).stat().st_size
        meta["edgemoe_store"] = {"path": str(quant), "bytes": edgemoe_size,
                                 "resident_bytes": (quant / RESIDENT_NAME).stat().st_size,
                                 "resident_format": (f"{res_kind} linear layers" if res_kind in ("int8", "int4")
                                                     else "bf16"),
                                 "expert_bytes": (quant / STORE_NAME).stat().st_size,
                                 "expert_format": sorted({e["format"] for e in man["experts"]})}
        return hf, quant, stores, label, edgemoe_size

    def check_peers(self, meta: dict, hf: Path, cfgs: list[C.Config]) -> Path | None:
        """llama.cpp's and transformers' environments (what is missing becomes unavailable,
        with the reason) and the configurations this installation lacks. Returns the GGUF
        file llama.cpp runs, or None."""
        gguf = None
        peer_info = {}
        if llama_included(cfgs):
            try:
                info = peers.check_llama(self.peers_python)
                gguf = self.gguf_source or model.ensure_gguf(  # a given GGUF runs as it is
                    self.work, hf, info, QTYPES[self.opts.bits or 4], self.peers_python, self.threads, self.log,
                    self.notes)
                peer_info["llama.cpp"] = {"bindings": f"ik-llama-cpp-python {info['version']}", "gguf": str(gguf),
                                          "gguf_type": self.gguf_types or QTYPES[self.opts.bits or 4],
                                          "gguf_bytes": model.source_stamp(gguf).get("source_bytes") or gguf.stat().st_size}
            except (peers.PeerError, RuntimeError, subprocess.SubprocessError, OSError) as e:
                self.unavailable["llama.cpp"] = str(e)
                self.log(f"llama.cpp unavailable: {e}")
        if transformers_included(cfgs) and "transformers" not in self.unavailable:
            try:
                peer_info["transformers"] = peers.check_transformers(self.peers_python)
            except (peers.PeerError, subprocess.SubprocessError, OSError) as e:
                self.unavailable["transformers"] = str(e)
                self.log(f"transformers unavailable: {e}")
        for c in cfgs:
            why_not = C.unavailable_reason(c, self.opts.plan)
            if why_not:
                self.unavailable[c.name] = why_not
        meta["peers"] = peer_info
        return gguf

    def model_size(self, meta: dict, hf: Path, gguf: Path | None, edgemoe_size: int, label: str) -> int:
        """The quantized model size the budgets are fractions of."""
        if self.gguf_source is not None:
            size, size_what = model.source_stamp(hf)["source_bytes"], f"the GGUF file given ({self.gguf_types} experts)"
        elif gguf is not None:
            size, size_what = gguf.stat().st_size, f"the GGUF file at matching bits ({QTYPES[self.opts.bits or 4]})"
        else:
            size, size_what = edgemoe_size, f"edgemoe's {label} store (resident weights + experts; no GGUF in this run)"
        meta["size_bytes"], meta["size_of"] = size, size_what
        return size

    def reference_run(self, meta: dict, hf: Path, quant: Path, label: str) -> tuple[list[int], Path, int, int]:
        """The token stream: the prompt, then the greedy tokens of an unconstrained IO-FREE
        run, which also records the routing trace (for Belady) and measures edgemoe's
        process overhead. Returns (forced token ids, trace path, overhead bytes, bytes of the KV
        cache and workspace reserved inside --memory)."""
        from edgemoe.tokenizer import Tokenizer

        opts = self.opts
        # (A GGUF's tokenizer is the one its conversion built from the metadata.)
        self.prompt_ids = Tokenizer(quant if self.gguf_source is not None else hf).encode(opts.prompt or DEFAULT_PROMPT)
        self.tmp.mkdir(parents=True, exist_ok=True)
        trace = self.work / f"trace-{hf.name}-{label}.npz"
        self.log(f"reference run: edgemoe IO-FREE, greedy, {opts.tokens} tokens, recording the routing trace")
        ref = self.run_child(self.edgemoe_launch(quant, {"mode": "io-free"}, None, None, trace), None)
        if ref.get("status") != "ok":
            raise RuntimeError(f"the reference run failed ({ref.get('status')}): {ref.get('error')}\n"
                               f"{ref.get('log_tail', '')[-1500:]}")
        forced = ref["token_ids"]
        es = ref["engine_stats"]
        overhead = ref["proc_status"]["VmHWM"] - es["budget_used_bytes"]
        # Inside --memory but not model bytes: what llama.cpp's measured overhead holds too
        # (its KV cache and compute buffers), so with --limit-adds-overhead its limit adds them.
        reserved = es["kv_bytes"] + es["workspace_bytes"]
        meta["token_stream"] = {"prompt_tokens": len(self.prompt_ids), "generated_tokens": len(forced),
                                "prompt": opts.prompt or DEFAULT_PROMPT, "prompt_ids": self.prompt_ids,
                                "forced_ids": forced}
        meta["edgemoe_overhead"] = {
            "bytes": overhead, "margin_bytes": MARGIN, "baseline_rss_bytes": es["baseline_rss_bytes"],
            "reserved_bytes": reserved,
            "how": "peak RSS of the unconstrained reference run minus what its --memory accounting held (resident "
                   "weights, experts, and the KV cache and compute workspace it reserves): the interpreter, torch "
                   "and tokenizer. edgemoe's --memory is the cgroup limit minus this overhead minus the margin, so "
                   "that the whole process fits the limit. reserved_bytes: the KV cache and workspace reservations, "
                   "which --limit-adds-overhead adds to edgemoe's limit as llama.cpp's measured overhead holds its "
                   "KV cache and compute buffers."}
        return forced, trace, overhead, reserved

    def run_all(self, meta: dict, cfgs: list[C.Config], budgets: list[float | None], run: _Runs) -> list[dict]:
        """Every runnable configuration at every budget, `--repeats` times, engines
        alternating; the unavailable ones as rows that say why."""
        opts = self.opts
        rows: list[dict] = []
        quiet_log = []
        stop_at: set[tuple[str, str]] = set()  # (config, budget) that ended without finishing: not rerun
        runnable = [c for c in cfgs if c.name not in self.unavailable and c.engine not in self.unavailable]
        for c in cfgs:
            if c not in runnable:
                why_not = self.unavailable.get(c.name) or self.unavailable.get(c.engine)
                for f in budgets:
                    if f is None and not c.unlimited:
                        continue
                    rows.append(report.make_row(c.engine, c.name, f, None if f is None else int(f * run.size), 0,
                                                {"status": "unavailable", "error": why_not}))
        for rep in range(1, opts.repeats + 1):
            if opts.wait_quiet:
                q = machine.wait_quiet(opts.wait_quiet, log=self.log)
                q["repeat"] = rep
                quiet_log.append(q)
            order = runnable[(rep - 1) % max(1, len(runnable)):] + runnable[:(rep - 1) % max(1, len(runnable))]
            for f in budgets:
                for c in order:
                    label = report.budget_label(f)
                    if (f is None and not c.unlimited) or (c.role == "bound" and rep > 1) or (c.name, label) in stop_at:
                        continue
                    limit = None if f is None else int(f * run.size) + (self.overheads[c.engine] if self.adds_overhead else 0)
                    row = self.one_run(c, f, limit, rep, run.stores, run.gguf, run.forced, run.trace, run.overhead,
                                       run.transformers_base, run.hf)
                    if c.engine == "llama.cpp" and f is None and row["status"] == "ok" and rep == 1 and run.gguf:
                        self.overheads["llama.cpp"] = max((row["peak_rss_bytes"] or 0) - run.gguf.stat().st_size, 0) + MARGIN
                        meta["llama_cpp_overhead_bytes"] = self.overheads["llama.cpp"]
                    rows.append(row)
                    if row["status"] != "ok":
                        stop_at.add((c.name, label))
                    self.log(f"repeat {rep} {label:>9} {c.name:12s} {row['status']:8s} "
                             + (f"decode {row['decode_tok_s']:.2f} tok/s prefill {row['prefill_tok_s']:.1f} tok/s "
                                f"read {format_bytes(row['bytes_read'] or 0)} peak {format_bytes(row['cgroup_peak_bytes'] or row['peak_rss_bytes'] or 0)}"
                                if row["status"] == "ok" else (row["error"] or "")[:160]))
        self.quiet_log = quiet_log
        return rows

    def finish_meta(self, meta: dict, rows: list[dict], t_start: float) -> None:
        """What the results say about the run as a whole: load, duration, settings, notes."""
        meta["loadavg_end"] = machine.loadavg()
        meta["quiet_waits"] = self.quiet_log
        meta["duration_s"] = round(time.time() - t_start)
        meta["threads"] = self.threads
        meta["timeout_s"] = self.opts.timeout
        meta["repeats"] = self.opts.repeats
        meta["notes"] = self.notes
        meta["unavailable"] = self.unavailable
        loads = [r["loadavg_before"][0] for r in rows if r.get("loadavg_before")]
        meta["loadavg_during"] = {"min": min(loads), "median": sorted(loads)[len(loads) // 2], "max": max(loads)} if loads else None

    def transformers_baseline(self) -> int:
        """Peak RSS of the peers' interpreter once torch, transformers and accelerate are
        imported: what transformers needs besides the weights."""
        code = ("import torch, transformers, accelerate\nfrom transformers import AutoModelForCausalLM\n"
                "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
        proc = subprocess.run([str(self.peers_python), "-c", code], capture_output=True, text=True, timeout=300)
        return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else 600 << 20

    def one_run(self, c, fraction, limit, rep, stores, gguf, forced, trace, overhead, tbase, hf) -> dict:
        memory_arg = None
        if c.engine == C.EDGEMOE:
            rt = C.edgemoe_runtime(c)
            if c.runtime.get("cache_policy") == "belady":
                rt["trace"] = str(trace)
            if limit is not None:
                memory_arg = limit - overhead - MARGIN
                if memory_arg <= 0:
                    return report.make_row(c.engine, c.name, fraction, limit, rep, {
                        "status": "refused",
                        "error": f"the limit {format_bytes(limit)} leaves nothing for the model after edgemoe's measured "
                                 f"process overhead of {format_bytes(overhead)} (+{format_bytes(MARGIN)} margin)"})
            launch = self.edgemoe_launch(stores[c.store], rt, memory_arg, forced)
        elif c.engine == C.LLAMA:
            spec = {"gguf": str(gguf), "prompt_ids": self.prompt_ids, "forced_ids": forced, "threads": self.threads,
                    "repack": False, "mmap": True}
            launch = Launch([str(self.peers_python), child_script("llama_run.py")], spec)
        else:
            offload = self.tmp / f"offload-{os.getpid()}-{rep}"
            cpu_bytes = None if limit is None else max(limit - tbase - MARGIN - limit // 10, 0)
            memory_arg = cpu_bytes
            spec = {"hf_dir": str(hf), "cpu_bytes": cpu_bytes, "offload_dir": str(offload),
                    "prompt_ids": self.prompt_ids, "forced_ids": forced, "threads": self.threads}
            launch = Launch([str(self.peers_python), child_script("transformers_run.py")], spec)
            try:
                out = self.run_child(launch, limit)
            finally:
                shutil.rmtree(offload, ignore_errors=True)
            return report.make_row(c.engine, c.name, fraction, limit, rep, out, memory_arg)
        out = self.run_child(launch, limit)
        return report.make_row(c.engine, c.name, fraction, limit, rep, out, memory_arg)


def llama_included(cfgs) -> bool:
    return any(c.engine == "llama.cpp" for c in cfgs)


def transformers_included(cfgs) -> bool:
    return any(c.engine == "transformers" for c in cfgs)


