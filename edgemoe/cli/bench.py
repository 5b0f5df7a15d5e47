"""`edgemoe bench`: edgemoe side by side with llama.cpp and transformers (accelerate disk
offload), on the same weights and the same token stream, each run in its own process
inside a memory cgroup limited to a fraction of the quantized model size.

    edgemoe bench --setup                      # once: the peers' environment (llama.cpp, accelerate)
    edgemoe bench                              # the comparison -> bench/results/peer/
    edgemoe bench --model bundled --budgets 100 --repeats 1 --engines edgemoe --no-cgroup
    edgemoe bench --model Qwen3-30B-A3B-Q4_K_M.gguf  # from a GGUF: llama.cpp runs the file as it is,
                                                     # edgemoe converts it (transformers needs a directory)

See edgemoe/bench/ for the pieces and README "Benchmark against llama.cpp" for how to read
the results.
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
from pathlib import Path

from ..errors import InvalidArgument
from ..store.names import MANIFEST_NAME, RESIDENT_NAME, STORE_NAME
from ..utils import format_bytes

DEFAULT_PROMPT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def norm(self):\n"
)
QTYPES = {4: "Q4_0", 8: "Q8_0"}
MARGIN = 32 << 20  # kept free below the cgroup limit for what the overhead measurement misses


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
                   help="comma-separated configuration names (default: all; see edgemoe/bench/configs.py)")
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
    p.add_argument("--resident", choices=("int8", "float"), default="int8",
                   help="non-expert weights of the quantized edgemoe stores (IO-QEXP, LRU-only, EdgeMoE, IO-FREE): "
                        "int8 (default; llama.cpp's GGUF quantizes attention too) or float (bf16); IO-EXP stays bf16")
    p.add_argument("--plan", default=None, metavar="PLAN.json",
                   help="per-expert bitwidth plan for the full EdgeMoE configuration (edgemoe convert --plan)")
    p.add_argument("--no-cgroup", action="store_true", help="run without memory cgroups (no limits enforced)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each repeat, wait up to SECONDS for other processes to leave the CPUs idle")
    p.add_argument("--out", default="bench/results/peer", help="output directory (default bench/results/peer)")
    p.add_argument("--work", default="bench/work/peer",
                   help="work directory for models, converted files and the peers' environment (default bench/work/peer)")
    p.add_argument("--peers-python", default=None,
                   help="python of the peers' environment (default: WORK/peers/bin/python)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    return p


class Bench:
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
        from ..bench.model import MixtralSpec, write_random_mixtral

        m = self.opts.model
        if m == "random":
            spec = MixtralSpec()
            path = self.work / "hf-random"
            if not (path / "config.json").exists():
                self.log(f"writing the random model ({spec.params(4096) / 1e9:.2f} B parameters) to {path}")
            write_random_mixtral(path, spec, progress=lambda i, n: self.log(f"  shard {i}/{n}"))
            return path, spec.describe(json.loads((path / "config.json").read_text())["vocab_size"])
        if m == "bundled":
            from ..assets import MODEL_DIR

            cfg = json.loads((Path(MODEL_DIR) / "config.json").read_text())
            return Path(MODEL_DIR), (f"the bundled trained tiny MoE ({cfg['model_type']}, {cfg['num_hidden_layers']} "
                                     f"layers x {cfg.get('num_local_experts', cfg.get('num_experts'))} experts, hidden "
                                     f"{cfg['hidden_size']}): trained routing")
        path = Path(m)
        from ..store.gguf import GGUFCheckpoint
        from ..store.names import is_gguf

        if is_gguf(path):
            ckpt = GGUFCheckpoint(path)  # a missing, damaged or unsupported file fails here, named
            types = sorted({t for ts in ckpt.expert_types().values() for t in ts})
            self.gguf_source, self.gguf_types = path.resolve(), "/".join(types)
            return self.gguf_source, (f"{path} (GGUF {ckpt.arch_name}, {ckpt.config['model_type']}; experts "
                                      f"{self.gguf_types}, {ckpt.args.num_hidden_layers} layers x "
                                      f"{ckpt.args.experts_per_layer} experts)")
        if not (path / "config.json").exists():
            raise InvalidArgument(f"{path}: not a Hugging Face model directory (no config.json) nor a GGUF file; "
                                  "--model takes 'random', 'bundled', a directory or a .gguf file")
        return path.resolve(), f"{path} ({json.loads((path / 'config.json').read_text()).get('model_type')})"

    @staticmethod
    def source_stamp(src: Path) -> dict:
        """What identifies the source's content for the conversion caches."""
        if src.is_dir():
            return {"source": str(src), "source_mtime": (src / "config.json").stat().st_mtime}
        from ..store.gguf import split_parts

        st = [p.stat() for p in split_parts(src)]
        return {"source": str(src), "source_mtime": max(x.st_mtime for x in st), "source_bytes": sum(x.st_size for x in st)}

    def ensure_store(self, hf: Path, name: str, flags: list[str]) -> Path:
        """`edgemoe convert` into WORK/NAME once (again when the source or flags change)."""
        out = self.work / name
        stamp = {**self.source_stamp(hf), "flags": flags}
        stamp_file = out / "bench-source.json"
        if (out / MANIFEST_NAME).exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
            return out
        self.log(f"edgemoe convert {hf} -> {out} {' '.join(flags)}")
        proc = subprocess.run([sys.executable, "-m", "edgemoe", "convert", str(hf), str(out), *flags, "--force",
                               "--quiet", "--json"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"edgemoe convert failed: {proc.stderr.strip()[-1000:]}")
        stamp_file.write_text(json.dumps(stamp))
        return out

    def ensure_gguf(self, hf: Path, info: dict) -> Path:
        qtype = QTYPES[self.opts.bits or 4]
        d = self.work / ("gguf-" + hf.name)
        out = d / f"model-{qtype}.gguf"
        stamp = {"source": str(hf), "source_mtime": (hf / "config.json").stat().st_mtime, "qtype": qtype,
                 "bindings": info.get("version"), "converter_wrapper": 2}
        stamp_file = d / f"model-{qtype}.json"
        if out.exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
            return out
        d.mkdir(parents=True, exist_ok=True)
        f16 = d / "model-bf16.gguf.partial"
        self.log(f"GGUF: converting {hf} with llama.cpp's convert_hf_to_gguf.py (bf16)")
        from ..bench.runner import child_script

        proc = subprocess.run([str(self.peers_python), child_script("gguf_convert.py"), info["converter"], str(hf),
                               str(f16), "bf16"], capture_output=True, text=True)
        if proc.returncode != 0 or not f16.exists():
            f16.unlink(missing_ok=True)
            raise RuntimeError(f"GGUF conversion failed: {proc.stderr.strip()[-1500:]}")
        for line in proc.stderr.splitlines():
            if line.startswith("gguf_convert:"):
                self.notes.append("GGUF conversion: " + line.split(":", 1)[1].strip())
        self.log(f"GGUF: llama-quantize {qtype}")
        partial = out.with_suffix(".gguf.partial")
        proc = subprocess.run([info["quantize"], str(f16), str(partial), qtype, str(self.threads)],
                              capture_output=True, text=True)
        f16.unlink(missing_ok=True)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"llama-quantize failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")
        partial.rename(out)
        stamp_file.write_text(json.dumps(stamp))
        return out

    # -- the runs ---------------------------------------------------------------------------------
    def run_child(self, launch, limit: int | None) -> dict:
        from ..bench import runner

        return runner.run(launch, ctl=self.ctl, limit=limit, timeout_s=self.opts.timeout, tmp_root=self.tmp)

    def edgemoe_launch(self, store: Path, runtime: dict, memory: int | None, forced, record_trace=None):
        from ..bench.runner import Launch, child_script

        spec = {"model": str(store), "memory": memory, "runtime": runtime, "prompt_ids": self.prompt_ids,
                "forced_ids": forced, "max_tokens": self.opts.tokens, "threads": self.threads,
                "record_trace": str(record_trace) if record_trace else None}
        pkg_root = str(Path(__file__).resolve().parent.parent.parent)
        env = {"PYTHONPATH": pkg_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        return Launch([sys.executable, child_script("edgemoe_run.py")], spec, env)

    def main(self) -> int:
        from ..bench import cgroup, configs as C, machine, report
        from ..bench import peers

        opts = self.opts
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
        self.work.mkdir(parents=True, exist_ok=True)
        t_start = time.time()
        meta: dict = {"command": "edgemoe bench " + shlex.join(self.argv), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                      "machine": machine.describe(), "loadavg_start": machine.loadavg()}

        # Memory cgroups.
        if opts.no_cgroup:
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

        # Model and its converted forms.
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
        resident = ["--resident", opts.resident]
        if gguf_in and opts.bits is None:
            label = "gguf"  # the converter's default plan: the file's own precision
            quant = self.ensure_store(hf, f"edgemoe-gguf-{hf.stem}", resident)
        else:
            bits = opts.bits or 4
            label = f"int{bits}"
            quant = self.ensure_store(hf, f"edgemoe-int{bits}-{hf.name}", ["--bits", str(bits), *resident])
        stores = {"quant": quant}
        if any(c.store == "bf16" for c in cfgs):
            stores["bf16"] = self.ensure_store(hf, f"edgemoe-bf16-{hf.name}", ["--bits", "16"])
        if opts.plan and any(c.store == "plan" for c in cfgs):
            stores["plan"] = self.ensure_store(hf, f"edgemoe-plan-{hf.name}", ["--plan", str(Path(opts.plan).resolve()), *resident])
        man = json.loads((quant / MANIFEST_NAME).read_text())
        edgemoe_size = (quant / RESIDENT_NAME).stat().st_size + (quant / STORE_NAME).stat().st_size
        meta["edgemoe_store"] = {"path": str(quant), "bytes": edgemoe_size,
                                 "resident_bytes": (quant / RESIDENT_NAME).stat().st_size,
                                 "resident_format": "int8 linear layers" if opts.resident == "int8" else "bf16",
                                 "expert_bytes": (quant / STORE_NAME).stat().st_size,
                                 "expert_format": sorted({e["format"] for e in man["experts"]})}

        # Peers.
        gguf = None
        peer_info = {}
        if llama_included(cfgs):
            try:
                info = peers.check_llama(self.peers_python)
                gguf = self.gguf_source or self.ensure_gguf(hf, info)  # a given GGUF runs as it is
                peer_info["llama.cpp"] = {"bindings": f"ik-llama-cpp-python {info['version']}", "gguf": str(gguf),
                                          "gguf_type": self.gguf_types or QTYPES[opts.bits or 4],
                                          "gguf_bytes": self.source_stamp(gguf).get("source_bytes") or gguf.stat().st_size}
            except (peers.PeerError, RuntimeError, subprocess.SubprocessError, OSError) as e:
                self.unavailable["llama.cpp"] = str(e)
                self.log(f"llama.cpp unavailable: {e}")
        if TRANSFORMERS_ON(cfgs) and "transformers" not in self.unavailable:
            try:
                peer_info["transformers"] = peers.check_transformers(self.peers_python)
            except (peers.PeerError, subprocess.SubprocessError, OSError) as e:
                self.unavailable["transformers"] = str(e)
                self.log(f"transformers unavailable: {e}")
        for c in cfgs:
            why_not = C.unavailable_reason(c, opts.plan)
            if why_not:
                self.unavailable[c.name] = why_not
        meta["peers"] = peer_info

        # The quantized model size the budgets are fractions of.
        if gguf_in:
            size, size_what = self.source_stamp(hf)["source_bytes"], f"the GGUF file given ({self.gguf_types} experts)"
        elif gguf is not None:
            size, size_what = gguf.stat().st_size, f"the GGUF file at matching bits ({QTYPES[opts.bits or 4]})"
        else:
            size, size_what = edgemoe_size, f"edgemoe's {label} store (resident weights + experts; no GGUF in this run)"
        meta["size_bytes"], meta["size_of"] = size, size_what

        # Token stream: the prompt, then the greedy tokens of an unconstrained IO-FREE run.
        from ..tokenizer import Tokenizer

        # (A GGUF's tokenizer is the one its conversion built from the metadata.)
        self.prompt_ids = Tokenizer(quant if gguf_in else hf).encode(opts.prompt or DEFAULT_PROMPT)
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
        meta["token_stream"] = {"prompt_tokens": len(self.prompt_ids), "generated_tokens": len(forced),
                                "prompt": opts.prompt or DEFAULT_PROMPT, "prompt_ids": self.prompt_ids,
                                "forced_ids": forced}
        meta["edgemoe_overhead"] = {
            "bytes": overhead, "margin_bytes": MARGIN, "baseline_rss_bytes": es["baseline_rss_bytes"],
            "how": "peak RSS of the unconstrained reference run minus the model bytes it held (resident weights + "
                   "experts): the interpreter, torch, tokenizer, activations and KV cache. edgemoe's --memory is "
                   "the cgroup limit minus this overhead minus the margin, so that the whole process fits the limit."}

        # Disk bandwidth.
        machine.drop_caches()
        bw = machine.disk_read_bandwidth(quant / STORE_NAME)
        meta["disk"] = bw
        self.log(f"disk: {format_bytes(bw['bytes_per_s'])}/s ({bw['mode']} reads of {format_bytes(bw['chunk_bytes'])})")

        transformers_base = None
        if TRANSFORMERS_ON(cfgs) and "transformers" not in self.unavailable:
            transformers_base = self.transformers_baseline()
            meta["transformers_overhead_bytes"] = transformers_base

        adds = opts.limit_adds_overhead if opts.limit_adds_overhead is not None else opts.model == "bundled"
        self.adds_overhead = adds
        # Each engine's process overhead (added to its limit with --limit-adds-overhead).
        self.overheads = {"edgemoe": overhead + MARGIN, "transformers": (transformers_base or 0) + MARGIN,
                          "llama.cpp": 64 << 20}  # replaced by the measurement of the first unlimited llama.cpp run
        meta["limit_adds_overhead"] = adds
        budgets: list[float | None] = ([] if opts.no_unlimited else [None]) + fractions
        labels = [report.budget_label(f) for f in budgets]
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
                    rows.append(report.make_row(c.engine, c.name, f, None if f is None else int(f * size), 0,
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
                    limit = None if f is None else int(f * size) + (self.overheads[c.engine] if adds else 0)
                    row = self.one_run(c, f, limit, rep, stores, gguf, forced, trace, overhead, transformers_base, hf)
                    if c.engine == "llama.cpp" and f is None and row["status"] == "ok" and rep == 1 and gguf:
                        self.overheads["llama.cpp"] = max((row["peak_rss_bytes"] or 0) - gguf.stat().st_size, 0) + MARGIN
                        meta["llama_cpp_overhead_bytes"] = self.overheads["llama.cpp"]
                    rows.append(row)
                    if row["status"] != "ok":
                        stop_at.add((c.name, label))
                    self.log(f"repeat {rep} {label:>9} {c.name:12s} {row['status']:8s} "
                             + (f"decode {row['decode_tok_s']:.2f} tok/s prefill {row['prefill_tok_s']:.1f} tok/s "
                                f"read {format_bytes(row['bytes_read'] or 0)} peak {format_bytes(row['cgroup_peak_bytes'] or row['peak_rss_bytes'] or 0)}"
                                if row["status"] == "ok" else (row["error"] or "")[:160]))
        meta["loadavg_end"] = machine.loadavg()
        meta["quiet_waits"] = quiet_log
        meta["duration_s"] = round(time.time() - t_start)
        meta["threads"] = self.threads
        meta["timeout_s"] = opts.timeout
        meta["repeats"] = opts.repeats
        meta["notes"] = self.notes
        meta["unavailable"] = self.unavailable
        loads = [r["loadavg_before"][0] for r in rows if r.get("loadavg_before")]
        meta["loadavg_during"] = {"min": min(loads), "median": sorted(loads)[len(loads) // 2], "max": max(loads)} if loads else None
        from ..bench.write import write_results

        write_results(self.out, meta, rows, labels, fractions, size, bw, self.log)
        return 0

    def transformers_baseline(self) -> int:
        """Peak RSS of the peers' interpreter once torch, transformers and accelerate are
        imported: what transformers needs besides the weights."""
        code = ("import torch, transformers, accelerate\nfrom transformers import AutoModelForCausalLM\n"
                "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
        proc = subprocess.run([str(self.peers_python), "-c", code], capture_output=True, text=True, timeout=300)
        return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else 600 << 20

    def one_run(self, c, fraction, limit, rep, stores, gguf, forced, trace, overhead, tbase, hf) -> dict:
        from ..bench import configs as C, report
        from ..bench.runner import Launch, child_script

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


def TRANSFORMERS_ON(cfgs) -> bool:
    return any(c.engine == "transformers" for c in cfgs)


def main(argv: list[str]) -> int:
    opts = build_parser().parse_args(argv)
    from .common import check_output_dir

    check_output_dir(opts.out, "--out")
    check_output_dir(opts.work, "--work")
    if opts.setup:
        from ..bench import peers

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
    return Bench(opts, argv).main()
