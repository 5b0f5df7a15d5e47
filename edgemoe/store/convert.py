"""`edgemoe convert`: Hugging Face checkpoint -> resident weights + expert store + manifest.

The checkpoint is streamed one tensor at a time. Resident (non-expert) tensors are kept
(the runtime needs them in RAM anyway); an expert's gate/up/down are held only until its
three parts have arrived, then encoded in its planned format and appended to the store
as one aligned blob. Peak memory is therefore the resident weights plus about one
checkpoint tensor, not the model.

Everything is written into a hidden sibling directory that is renamed to OUT_DIR only
once complete; the manifest is the last file written into it. A killed conversion leaves
no OUT_DIR (and the next conversion to the same place removes the debris).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import __version__
from ..checkpoint import HFCheckpoint, check_expert_tensor, load_resident, parse_dtype
from ..errors import EdgeMoEError, ModelLoadError
from ..models.base import EXPERT_KEY
from ..quant.formats import get_format
from ..quant.resident import RESIDENT_FORMATS, quantize_resident
from ..utils import peak_rss_bytes, pid_alive, return_large_frees_to_os, rss_bytes
from .format import (
    ALIGN,
    MANIFEST_NAME,
    RESIDENT_NAME,
    STORE_NAME,
    ExpertEntry,
    ExpertPlan,
    FormatInfo,
    Manifest,
    dtype_name,
    round_up,
    store_header,
)
from .tensorfile import crc32_of, read_header, tensor_bytes, write_tensors

BITS_TO_FORMAT = {16: "bf16", 8: "int8", 4: "int4"}
FLOAT_FORMAT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Files copied next to the converted weights (tokenizer, chat template, generation defaults).
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
             "vocab.json", "merges.txt", "tokenizer.model")
_ZEROS = bytes(ALIGN)


@dataclass
class ConvertResult:
    out: Path
    model_type: str
    dtype: str
    resident_bytes: int
    store_bytes: int
    experts: int
    formats: dict[str, int]  # format name -> number of experts
    seconds: float
    baseline_rss_bytes: int
    peak_rss_bytes: int
    source_bytes: int
    copied: list[str] = field(default_factory=list)
    resident_int8: list[str] = field(default_factory=list)  # resident linear layers stored as int8

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def resolve_plan(bits: int | None, fmt: str | None, plan: ExpertPlan | str | Path | None,
                 dtype: torch.dtype) -> ExpertPlan:
    """One plan from the mutually exclusive --bits / --format / --plan options. Without
    any, experts are stored unquantized in the compute dtype."""
    given = [o for o in (bits, fmt, plan) if o is not None]
    if len(given) > 1:
        raise EdgeMoEError("give at most one of --bits, --format and --plan")
    if isinstance(plan, ExpertPlan):
        return plan
    if plan is not None:
        return ExpertPlan.read(plan)
    if bits is not None:
        if bits not in BITS_TO_FORMAT:
            raise EdgeMoEError(f"--bits must be one of {', '.join(map(str, BITS_TO_FORMAT))}, got {bits}")
        return ExpertPlan(BITS_TO_FORMAT[bits])
    return ExpertPlan(fmt or FLOAT_FORMAT[dtype])


def _partial_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def _remove_stale(out: Path) -> None:
    """Debris of conversions that were killed (their process is gone)."""
    for d in _partial_dirs(out):
        pid = d.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _StoreWriter:
    """Appends expert blobs to experts.bin at ALIGN boundaries, tracking checksums."""

    def __init__(self, path: Path, store_id: str):
        self.f = open(path, "wb")
        self.f.write(store_header(store_id))
        self.pos = self.f.tell()
        self.entries: list[ExpertEntry] = []

    def write(self, layer: int, expert: int, info: FormatInfo, parts: dict[str, torch.Tensor]) -> ExpertEntry:
        start, crc, pos = self.pos, 0, 0
        for p in info.parts:
            view = tensor_bytes(parts[p.name])
            gap = p.offset - pos  # zero bytes up to the part's aligned offset (checksummed too)
            if gap:
                self.f.write(_ZEROS[:gap])
                crc = zlib.crc32(_ZEROS[:gap], crc)
            self.f.write(view)
            crc = zlib.crc32(view, crc)
            pos = p.offset + len(view)
        pad = round_up(pos) - pos
        if pad:
            self.f.write(_ZEROS[:pad])
        self.pos = start + pos + pad
        entry = ExpertEntry(layer, expert, info.name, start, pos, crc)
        self.entries.append(entry)
        return entry

    def close(self) -> int:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.pos


def _encode(fmt, info: FormatInfo, gate, up, down, where: str) -> dict[str, torch.Tensor]:
    parts = fmt.encode(gate, up, down)
    for p in info.parts:
        t = parts.get(p.name)
        if t is None or t.dtype != p.dtype or tuple(t.shape) != p.shape:
            got = None if t is None else (t.dtype, tuple(t.shape))
            raise EdgeMoEError(f"{where}: format {info.name} encoded part {p.name!r} as {got}, "
                               f"but its layout says {(p.dtype, p.shape)}")
    return {p.name: parts[p.name].contiguous() for p in info.parts}


def convert(src: str | Path, out: str | Path, *, bits: int | None = None, fmt: str | None = None,
            plan: ExpertPlan | str | Path | None = None, dtype: str | torch.dtype | None = None,
            resident: str | None = None, force: bool = False, progress: bool = False) -> ConvertResult:
    """Convert the Hugging Face checkpoint at `src` into an offloadable model at `out`.
    resident: "float" (default: the resident weights in the compute dtype) or "int8"
    (resident linear layers as int8, see quant/resident.py)."""
    t0 = time.perf_counter()
    return_large_frees_to_os()  # freed tensors leave RSS at once (we free one per expert)
    baseline = rss_bytes()
    src, out = Path(src), Path(out)
    ckpt = HFCheckpoint(src)
    args = ckpt.args
    dt = parse_dtype(dtype, ckpt.config)
    plan = resolve_plan(bits, fmt, plan, dt)
    plan.check(args.moe_layers(), args.experts_per_layer, "plan")
    if resident not in (None, *RESIDENT_FORMATS):
        raise EdgeMoEError(f"resident weights format must be one of {', '.join(RESIDENT_FORMATS)}, got {resident!r}")
    if out.resolve() == src.resolve():
        raise EdgeMoEError(f"{out}: the output directory must differ from the input")
    if out.exists() and not force:
        raise EdgeMoEError(f"{out}: already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)

    H, I = args.hidden_size, args.expert_dim
    formats = {name: get_format(name) for name in sorted(plan.names())}  # plan spelling -> format
    infos = {f.name: FormatInfo.of(f, H, I) for f in formats.values()}  # canonical name -> layout
    wanted = {(l, e) for l in args.moe_layers() for e in range(args.experts_per_layer)}
    source_bytes = sum(i.nbytes for f in {r.file for r in ckpt.refs} for i in read_header(f)[0].values())

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    store_id = uuid.uuid4().hex
    writer = None
    try:
        writer = _StoreWriter(tmp / STORE_NAME, store_id)
        tensors: dict[str, torch.Tensor] = {}  # resident
        pending: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        bar = tqdm(total=source_bytes, unit="B", unit_scale=True, desc="converting", disable=not progress,
                   leave=False, dynamic_ncols=True)
        for key, tensor in ckpt.tensors(None):
            bar.update(tensor.numel() * tensor.element_size())
            if not EXPERT_KEY.match(key):
                tensors[key] = tensor.to(dt) if tensor.is_floating_point() else tensor
                continue
            layer, expert, part = check_expert_tensor(args, key, tensor, str(src))
            got = pending.setdefault((layer, expert), {})
            if part in got or (layer, expert) not in wanted:
                raise ModelLoadError(f"{src}: layer {layer} expert {expert} {part} appears twice")
            got[part] = tensor
            if len(got) == 3:
                fmt = formats[plan.format_for(layer, expert)]
                where = f"{src}: layer {layer} expert {expert}"
                parts = _encode(fmt, infos[fmt.name], got["gate"], got["up"], got["down"], where)
                writer.write(layer, expert, infos[fmt.name], parts)
                del pending[(layer, expert)], parts
                wanted.discard((layer, expert))
        bar.close()
        store_bytes = writer.close()
        if wanted:
            l, e = min(wanted)
            lacking = [p for p in ("gate", "up", "down") if p not in pending.get((l, e), {})]
            raise ModelLoadError(f"{src}: layer {l} expert {e} is missing {', '.join(lacking)} weights"
                                 + (f" ({len(wanted) - 1} more experts incomplete)" if len(wanted) > 1 else ""))

        # Same checks as loading would do (names, shapes), so a bad checkpoint fails now.
        load_resident(ckpt.build(), tensors, str(src))
        int8 = quantize_resident(ckpt.build(), tensors, dt) if resident == "int8" else []
        resident_bytes = write_tensors(tmp / RESIDENT_NAME, tensors, {"format": "pt"})
        crcs = {name: crc32_of(t) for name, t in tensors.items()}
        del tensors

        copied = []
        for name in AUX_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())  # on disk before the rename makes the directory visible
                copied.append(name)
        entries = sorted(writer.entries, key=lambda e: e.key)
        manifest = Manifest(
            store_id=store_id, model_type=args.model_type, dtype=dtype_name(dt), config=ckpt.config,
            resident_file=RESIDENT_NAME, resident_bytes=resident_bytes, resident_tensors=crcs,
            store_file=STORE_NAME, store_bytes=store_bytes,
            formats={n: infos[n] for n in sorted({e.format for e in entries})},
            experts=entries, created_by=f"edgemoe {__version__}", resident_int8=int8, version=2 if int8 else 1,
        )
        manifest.write(tmp / MANIFEST_NAME)
        _fsync_dir(tmp)
        if out.exists():  # --force: swap the old directory out only once the new one is complete
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        if writer is not None and not writer.f.closed:
            writer.f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertResult(
        out=out, model_type=args.model_type, dtype=dtype_name(dt), resident_bytes=resident_bytes,
        store_bytes=store_bytes, experts=len(entries), formats=dict(Counter(e.format for e in entries)),
        seconds=time.perf_counter() - t0, baseline_rss_bytes=baseline, peak_rss_bytes=peak_rss_bytes(),
        source_bytes=source_bytes, copied=copied, resident_int8=int8,
    )
