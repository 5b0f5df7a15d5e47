"""The benchmark's model and its converted forms: the model `--model` names (a random
Mixtral written once, the bundled model, a Hugging Face directory or a GGUF file), the
edgemoe stores converted from it and the GGUF file llama.cpp runs, each made once into
the work directory and made again when its source or options change."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgemoe.errors import InvalidArgument
from edgemoe.store.names import MANIFEST_NAME

from .runner import child_script


@dataclass(frozen=True)
class BenchModel:
    path: Path  # a Hugging Face directory or a GGUF file
    description: str  # for the results
    gguf: bool = False  # `path` is a GGUF file (llama.cpp runs it as it is)
    gguf_types: str = ""  # a GGUF file's expert tensor types, e.g. "Q4_K/Q6_K"


def resolve_model(m: str, work: Path, log) -> BenchModel:
    """--model: 'random' (written into `work` once), 'bundled', a directory or a GGUF file."""
    from edgemoe_lab.checkpoints import MixtralSpec, write_random_mixtral

    if m == "random":
        spec = MixtralSpec()
        path = work / "hf-random"
        if not (path / "config.json").exists():
            log(f"writing the random model ({spec.params(4096) / 1e9:.2f} B parameters) to {path}")
        write_random_mixtral(path, spec, progress=lambda i, n: log(f"  shard {i}/{n}"))
        return BenchModel(path, spec.describe(json.loads((path / "config.json").read_text())["vocab_size"]))
    if m == "bundled":
        from edgemoe.assets import MODEL_DIR

        cfg = json.loads((Path(MODEL_DIR) / "config.json").read_text())
        return BenchModel(Path(MODEL_DIR), (f"the bundled trained tiny MoE ({cfg['model_type']}, {cfg['num_hidden_layers']} "
                                            f"layers x {cfg.get('num_local_experts', cfg.get('num_experts'))} experts, hidden "
                                            f"{cfg['hidden_size']}): trained routing"))
    path = Path(m)
    from edgemoe.store.gguf import GGUFCheckpoint
    from edgemoe.store.names import is_gguf

    if is_gguf(path):
        ckpt = GGUFCheckpoint(path)  # a missing, damaged or unsupported file fails here, named
        types = "/".join(sorted({t for ts in ckpt.expert_types().values() for t in ts}))
        return BenchModel(path.resolve(), (f"{path} (GGUF {ckpt.arch_name}, {ckpt.config['model_type']}; experts "
                                           f"{types}, {ckpt.args.num_hidden_layers} layers x "
                                           f"{ckpt.args.experts_per_layer} experts)"), gguf=True, gguf_types=types)
    if not (path / "config.json").exists():
        raise InvalidArgument(f"{path}: not a Hugging Face model directory (no config.json) nor a GGUF file; "
                              "--model takes 'random', 'bundled', a directory or a .gguf file")
    return BenchModel(path.resolve(), f"{path} ({json.loads((path / 'config.json').read_text()).get('model_type')})")


def source_stamp(src: Path) -> dict:
    """What identifies the source's content for the conversion caches."""
    if src.is_dir():
        return {"source": str(src), "source_mtime": (src / "config.json").stat().st_mtime}
    from edgemoe.store.gguf import split_parts

    st = [p.stat() for p in split_parts(src)]
    return {"source": str(src), "source_mtime": max(x.st_mtime for x in st), "source_bytes": sum(x.st_size for x in st)}


def ensure_store(work: Path, hf: Path, name: str, flags: list[str], log) -> Path:
    """`edgemoe convert` into WORK/NAME once (again when the source or flags change)."""
    out = work / name
    stamp = {**source_stamp(hf), "flags": flags}
    stamp_file = out / "bench-source.json"
    if (out / MANIFEST_NAME).exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return out
    log(f"edgemoe convert {hf} -> {out} {' '.join(flags)}")
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "convert", str(hf), str(out), *flags, "--force",
                           "--quiet", "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"edgemoe convert failed: {proc.stderr.strip()[-1000:]}")
    stamp_file.write_text(json.dumps(stamp))
    return out


def resident_tag(resident: list[str]) -> str:
    """The part of a store's directory name that tells its resident weights apart: "" for
    int8 (bench's default; the names of existing work directories stay valid), else
    "-res<kind>" (e.g. "-resint4"), so stores with other resident weights are not
    converted over each other. `resident`: the convert flags, ["--resident", kind]."""
    kind = resident[resident.index("--resident") + 1] if "--resident" in resident else "float"
    return "" if kind == "int8" else f"-res{kind}"


def plan_store(work: Path, hf: Path, kind: str, plan: Path, resident: list[str], log) -> Path:
    """A store of a plan kind (configs.PLAN_STORES) converted once: "plan" with the per-expert
    bitwidth plan, "plan-fallback" with it and the small copies of --fallback-bits."""
    from .configs import FALLBACK_BITS, PLAN_STORES

    if kind not in PLAN_STORES:
        raise ValueError(f"store kind {kind!r} is not one of {PLAN_STORES}")
    flags = ["--plan", str(plan.resolve())]
    tag = resident_tag(resident)
    name = f"edgemoe-plan{tag}-{hf.name}"
    if kind == "plan-fallback":
        flags += ["--fallback-bits", str(FALLBACK_BITS)]
        name = f"edgemoe-plan-fb{FALLBACK_BITS}{tag}-{hf.name}"
    return ensure_store(work, hf, name, flags + resident, log)


def ensure_gguf(work: Path, hf: Path, info: dict, qtype: str, peers_python: Path, threads: int, log,
                notes: list[str]) -> Path:
    """The checkpoint as a GGUF file of `qtype`, written once with llama.cpp's own converter
    and quantizer from the peers' environment (`info`: peers.check_llama). What the
    conversion reports goes to `notes`."""
    d = work / ("gguf-" + hf.name)
    out = d / f"model-{qtype}.gguf"
    stamp = {"source": str(hf), "source_mtime": (hf / "config.json").stat().st_mtime, "qtype": qtype,
             "bindings": info.get("version"), "converter_wrapper": 2}
    stamp_file = d / f"model-{qtype}.json"
    if out.exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return out
    d.mkdir(parents=True, exist_ok=True)
    f16 = d / "model-bf16.gguf.partial"
    log(f"GGUF: converting {hf} with llama.cpp's convert_hf_to_gguf.py (bf16)")
    proc = subprocess.run([str(peers_python), child_script("gguf_convert.py"), info["converter"], str(hf),
                           str(f16), "bf16"], capture_output=True, text=True)
    if proc.returncode != 0 or not f16.exists():
        f16.unlink(missing_ok=True)
        raise RuntimeError(f"GGUF conversion failed: {proc.stderr.strip()[-1500:]}")
    for line in proc.stderr.splitlines():
        if line.startswith("gguf_convert:"):
            notes.append("GGUF conversion: " + line.split(":", 1)[1].strip())
    log(f"GGUF: llama-quantize {qtype}")
    partial = out.with_suffix(".gguf.partial")
    proc = subprocess.run([info["quantize"], str(f16), str(partial), qtype, str(threads)],
                          capture_output=True, text=True)
    f16.unlink(missing_ok=True)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama-quantize failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    partial.rename(out)
    stamp_file.write_text(json.dumps(stamp))
    return out
