"""`edgemoe convert`: Hugging Face checkpoint -> resident weights + expert store + manifest.

The checkpoint is streamed one tensor at a time. Resident (non-expert) tensors are kept
(the runtime needs them in RAM anyway); an expert's gate/up/down are held only until its
three parts have arrived, then encoded in its planned format and appended to the store
as one aligned blob. Peak memory is therefore the resident weights plus about one
checkpoint tensor, not the model.

Everything is written into a hidden sibling directory, `.OUT.partial-PID`, that becomes
OUT_DIR only once complete; the manifest is the last file written into it. With --force
the new directory and the previous OUT_DIR are swapped in one atomic step where the
system can (Linux renameat2 RENAME_EXCHANGE), so OUT_DIR is at every instant the old
model or the new one. Elsewhere the previous OUT_DIR is first renamed to `.OUT.old-PID`:
a conversion killed between the two renames leaves OUT_DIR missing for a moment, and the
next conversion to the same place puts the previous model back before it starts
(`recover`). Whatever a killed conversion leaves (`.OUT.partial-PID`, `.OUT.old-PID`,
`.OUT.trash-PID` of a process that is gone) is removed by the next conversion.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import os
import re
import shutil
import sys
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .._version import __version__
from ..checkpoint import (FLOAT_PARTS, HFCheckpoint, build_on_meta, bias_names, check_expert_tensor, expert_biases, lacking_parts,
                          load_resident, parse_dtype)
from ..errors import EdgeMoEError, ModelLoadError
from ..models.base import EXPERT_KEY
from ..quant.formats import for_experts, get_format
from ..quant.mxfp4 import MXFP4Format, dequantize_parts
from ..quant.resident import RESIDENT_FORMATS, quantize_resident
from ..utils import peak_rss_bytes, pid_alive, return_large_frees_to_os, rss_bytes
from .gguf import GGUFCheckpoint
from .names import is_gguf
from .manifest import (
    ALIGN,
    MANIFEST_NAME,
    RESIDENT_NAME,
    STORE_NAME,
    ExpertBiases,
    ExpertEntry,
    FALLBACK_NAME,
    ExpertPlan,
    FallbackStore,
    FormatInfo,
    Manifest,
    dtype_name,
    manifest_version,
    round_up,
    store_header,
)
from .tensorfile import crc32_of, read_header, tensor_bytes, write_tensors

BITS_TO_FORMAT = {16: "bf16", 8: "int8", 4: "int4"}
# --fallback-bits: the small copies' format (symmetric: on the bundled model's experts as
# close to the floats as the asymmetric ones at 2 bits, and smaller)
FALLBACK_BITS = {2: "int2", 3: "int3"}
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
    resident_int4: list[str] = field(default_factory=list)  # resident linear layers stored as int4
    recovered: list[str] = field(default_factory=list)  # what `recover` did before converting
    added_error: dict = field(default_factory=dict)  # GGUF source: error re-quantizing added, per type -> format
    fallback_format: str | None = None  # the small copies' format (--fallback-bits), None without them
    fallback_bytes: int = 0  # their store file

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


def resolve_fallback(bits: int | None, fmt: str | None) -> str | None:
    """The format of the small fallback copies from --fallback-bits / --fallback-format
    (mutually exclusive; None: no fallback copies)."""
    if bits is not None and fmt is not None:
        raise EdgeMoEError("give at most one of --fallback-bits and --fallback-format")
    if bits is not None:
        if isinstance(bits, bool) or bits not in FALLBACK_BITS:
            raise EdgeMoEError(f"--fallback-bits must be one of {', '.join(map(str, FALLBACK_BITS))}, got {bits!r}")
        return FALLBACK_BITS[bits]
    if fmt is not None:
        get_format(fmt)  # an unknown name is refused here, before the checkpoint is read
    return fmt


def _crash_point(step: str) -> None:
    """Called at each step of installing the output; tests replace it to stop the
    conversion there (kill -9 or an exception) and check what the directory holds."""


_HIDDEN_KINDS = ("partial", "old", "trash")


def _hidden(out: Path) -> dict[str, list[tuple[Path, int]]]:
    """The hidden siblings of `out` that conversions create, by kind, with their pid."""
    found: dict[str, list[tuple[Path, int]]] = {k: [] for k in _HIDDEN_KINDS}
    pattern = re.compile(rf"\.{re.escape(out.name)}\.({'|'.join(_HIDDEN_KINDS)})-(\d+)")
    for d in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        m = pattern.fullmatch(d.name)
        if m:
            found[m[1]].append((d, int(m[2])))
    return found


def _remove(path: Path) -> None:
    """Delete a directory tree, or a file or link that stood where one was expected."""
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        try:
            path.unlink()
        except OSError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)


def _stale(pid: int) -> bool:
    """Whether what a conversion with this pid left is debris: its process is gone, or it
    is this process (which runs one conversion to a directory at a time)."""
    return pid == os.getpid() or not pid_alive(pid)


def interrupted(out: str | Path) -> Path | None:
    """The hidden directory holding the previous model of `out`, if a conversion was
    killed while it replaced `out` and `out` is missing (None otherwise). The next
    conversion to `out` restores it; loaders can name it in their error."""
    out = Path(out)
    if os.path.lexists(out) or not out.parent.is_dir():
        return None
    olds = [d for d, pid in _hidden(out)["old"] if _stale(pid)]
    return max(olds, key=lambda d: d.stat().st_mtime_ns) if olds else None


def recover(out: str | Path) -> list[str]:
    """Clean up after conversions to `out` that were killed (their process is gone):
    put the previous model back if one was killed between setting it aside and
    renaming its replacement into place, and delete everything else they left. Returns
    one line per model restored."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    notes = []
    old = interrupted(out)
    if old is not None:
        try:
            os.rename(old, out)
        except OSError as e:
            raise EdgeMoEError(f"{out}: missing, and the previous model in {old} (left by a conversion that was "
                               f"killed while replacing it) cannot be renamed back: {e.strerror or e}") from None
        _fsync_dir(out.parent)
        notes.append(f"restored {out} from {old.name}, left by a conversion that was killed while replacing it")
    for dirs in _hidden(out).values():
        for d, pid in dirs:
            if _stale(pid):
                _remove(d)
    return notes


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 with RENAME_EXCHANGE).
    False where the C library, the kernel or the file system cannot; other failures
    raise OSError."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.5
        except (OSError, AttributeError):
            _renameat2 = False
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _renameat2 = fn
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _install(tmp: Path, out: Path) -> None:
    """Make the complete directory `tmp` the output `out`, replacing what is there."""
    pid = os.getpid()
    trash = out.parent / f".{out.name}.trash-{pid}"
    if not os.path.lexists(out):
        os.rename(tmp, out)
        _fsync_dir(out.parent)
        _crash_point("installed")
        return
    if _exchange(tmp, out):
        _crash_point("exchanged")  # out: the new model, tmp: the previous one
        try:
            os.rename(tmp, trash)
        except OSError:  # the new model is in place: delete the old one where it is
            trash = tmp
    else:
        old = out.parent / f".{out.name}.old-{pid}"
        os.rename(out, old)
        try:
            _crash_point("set-aside")  # out missing: a killed run is undone by `recover`
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        _crash_point("renamed")
        try:
            os.rename(old, trash)  # from here on never restored
        except OSError:
            trash = old
    _fsync_dir(out.parent)
    _crash_point("trash")
    _remove(trash)


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

    def __init__(self, path: Path, store_id: str, dedup: bool = True):
        self.f = open(path, "wb")
        self.f.write(store_header(store_id))
        self.pos = self.f.tell()
        self.entries: list[ExpertEntry] = []
        self._blobs: dict[tuple, ExpertEntry] = {}  # (format, digest) -> the entry that owns the blob
        self.dedup = dedup  # off for fallback copies: they are shared exactly where the full copies are

    def write(self, layer: int, expert: int, info: FormatInfo, parts: dict[str, torch.Tensor]) -> ExpertEntry:
        """Append one expert's blob, or point at an identical one already written (merged
        experts, or any that happen to be equal) so that it is stored and cached once."""
        h = hashlib.blake2b(digest_size=16)
        if self.dedup:
            for p in info.parts:
                h.update(tensor_bytes(parts[p.name]))
        owner = self._blobs.get((info.name, h.digest())) if self.dedup else None
        if owner is not None:
            return self.share(layer, expert, owner)
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
        self._blobs[(info.name, h.digest())] = entry
        return entry

    def share(self, layer: int, expert: int, owner: ExpertEntry) -> ExpertEntry:
        """Record that this expert uses `owner`'s blob (written before)."""
        entry = ExpertEntry(layer, expert, owner.format, owner.offset, owner.size, owner.crc32, owner.key)
        self.entries.append(entry)
        return entry

    def close(self) -> int:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.pos


def _encode(fmt, info: FormatInfo, got: dict[str, torch.Tensor], dtype: torch.dtype, hidden: int, inter: int,
            where: str) -> dict[str, torch.Tensor]:
    """The blob tensors of one expert from its complete canonical parts: MXFP4 codes are
    kept code for code in the mxfp4 format and dequantized (exactly) for any other;
    biases are stored in the type the format asks for (`Format.bias_dtype`)."""
    if "gate_blocks" in got and isinstance(fmt, MXFP4Format):
        parts = fmt.encode_codes(got)
    elif "gate_blocks" in got:
        parts = fmt.encode(*dequantize_parts(got, hidden, inter))
    else:
        parts = fmt.encode(got["gate"], got.get("up"), got["down"])  # ungated experts have no up (UngatedFormat)
    parts.update({k: v.to(fmt.bias_dtype(dtype)) for k, v in expert_biases(got).items()})
    for p in info.parts:
        t = parts.get(p.name)
        if t is None or t.dtype != p.dtype or tuple(t.shape) != p.shape:
            got = None if t is None else (t.dtype, tuple(t.shape))
            raise EdgeMoEError(f"{where}: format {info.name} encoded part {p.name!r} as {got}, "
                               f"but its layout says {(p.dtype, p.shape)}")
    return {p.name: parts[p.name].contiguous() for p in info.parts}


def check_out_dir(out: Path, force: bool) -> list[str]:
    """Fail now if `out` cannot receive a conversion (it exists without `force`, or is not
    a directory, or its parent cannot be made), after finishing any interrupted swap there;
    returns notes on what was recovered. The CLI calls it before a hub download too."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeMoEError(f"{out.parent}: cannot create the output's parent directory: {e.strerror or e}") from None
    recovered = recover(out)
    if os.path.lexists(out) and not force:
        raise EdgeMoEError(f"{out}: already exists (pass --force to replace it)" + "".join(f"; {n}" for n in recovered))
    if os.path.lexists(out) and not out.is_dir():
        raise EdgeMoEError(f"{out}: exists and is not a directory; remove it first")
    return recovered


def convert(src: str | Path, out: str | Path, *, bits: int | None = None, fmt: str | None = None,
            plan: ExpertPlan | str | Path | None = None, dtype: str | torch.dtype | None = None,
            resident: str | None = None, force: bool = False, progress: bool = False,
            fallback_bits: int | None = None, fallback_format: str | None = None) -> ConvertResult:
    """Convert the Hugging Face checkpoint at `src` into an offloadable model at `out`.
    resident: "float" (default: the resident weights in the compute dtype), "int8" or
    "int4" (resident linear layers as int8 or group-wise int4, see quant/resident.py). fallback_bits (2 or 3) or
    fallback_format (a format name): also store a small copy of every expert in that
    format, which the runtime may read instead on a miss (manifest version 5)."""
    t0 = time.perf_counter()
    return_large_frees_to_os()  # freed tensors leave RSS at once (we free one per expert)
    baseline = rss_bytes()
    src, out = Path(src), Path(out)
    ckpt = GGUFCheckpoint(src) if is_gguf(src) else HFCheckpoint(src)
    gguf_src = ckpt if isinstance(ckpt, GGUFCheckpoint) else None
    args = ckpt.args
    dt = parse_dtype(dtype, ckpt.config)
    fp32 = build_on_meta(ckpt.family, args).fp32_names()  # resident tensors stored in fp32 whatever dt
    if gguf_src is not None and bits is None and fmt is None and plan is None:
        plan = gguf_src.default_plan(dt)  # keep at least the GGUF's precision
    if gguf_src is None and ckpt.expert_format == "mxfp4" and bits is None and fmt is None and plan is None:
        plan = ExpertPlan("mxfp4")  # keep the released codes as they are
    plan = resolve_plan(bits, fmt, plan, dt)
    plan.check(args.moe_layers(), args.experts_per_layer, "plan")
    fb_name = resolve_fallback(fallback_bits, fallback_format)
    if resident not in (None, *RESIDENT_FORMATS):
        raise EdgeMoEError(f"resident weights format must be one of {', '.join(RESIDENT_FORMATS)}, got {resident!r}")
    if out.resolve() == src.resolve():
        raise EdgeMoEError(f"{out}: the output directory must differ from the input")
    recovered = check_out_dir(out, force)

    H, I = args.hidden_size, args.expert_dim
    want_parts = getattr(ckpt, "expert_parts", FLOAT_PARTS)  # what makes an expert complete
    stored = bias_names(want_parts)  # bias tensors each blob carries
    biases = ExpertBiases(dt, stored) if stored else None
    # plan spelling -> format (for ungated experts, its one-matrix layout: quant/formats.UngatedFormat)
    formats = {name: for_experts(get_format(name), args.expert_gated) for name in sorted(plan.names())}
    infos = {f.name: FormatInfo.of(f, H, I, biases) for f in formats.values()}  # canonical name -> layout
    fb_fmt = for_experts(get_format(fb_name), args.expert_gated) if fb_name is not None else None
    if fb_fmt is not None:
        infos.setdefault(fb_fmt.name, FormatInfo.of(fb_fmt, H, I, biases))
    wanted = {(l, e) for l in args.moe_layers() for e in range(args.experts_per_layer)}
    source_bytes = gguf_src.source_bytes if gguf_src is not None else \
        sum(i.nbytes for f in {r.file for r in ckpt.refs} for i in read_header(f)[0].values())

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    _remove(tmp)
    try:
        tmp.mkdir()
    except OSError as e:
        raise EdgeMoEError(f"{tmp}: cannot create the output directory: {e.strerror or e}") from None
    store_id = uuid.uuid4().hex
    writer = fb_writer = None
    try:
        writer = _StoreWriter(tmp / STORE_NAME, store_id)
        if fb_fmt is not None:
            fb_writer = _StoreWriter(tmp / FALLBACK_NAME, store_id, dedup=False)
            fb_entries: dict[tuple[int, int], ExpertEntry] = {}
        tensors: dict[str, torch.Tensor] = {}  # resident
        pending: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        bar = tqdm(total=gguf_src.stream_bytes if gguf_src is not None else source_bytes, unit="B", unit_scale=True, desc="converting", disable=not progress,
                   leave=False, dynamic_ncols=True)
        for key, tensor in ckpt.tensors(None):
            bar.update(tensor.numel() * tensor.element_size())
            if not EXPERT_KEY.match(key):
                keep = torch.float32 if key in fp32 else dt
                tensors[key] = tensor.to(keep) if tensor.is_floating_point() else tensor
                continue
            layer, expert, part = check_expert_tensor(args, key, tensor, str(src))
            got = pending.setdefault((layer, expert), {})
            if part in got or (layer, expert) not in wanted:
                raise ModelLoadError(f"{src}: layer {layer} expert {expert} {part} appears twice")
            got[part] = tensor
            if len(got) == len(want_parts):
                fmt = formats[plan.format_for(layer, expert)]
                where = f"{src}: layer {layer} expert {expert}"
                parts = _encode(fmt, infos[fmt.name], got, dt, H, I, where)
                if gguf_src is not None:
                    gguf_src.observe_expert(layer, expert, fmt, got, parts)
                entry = writer.write(layer, expert, infos[fmt.name], parts)
                del parts
                if fb_writer is not None:  # the small copy, shared exactly where the full one is
                    fb_entries[entry.key] = (fb_writer.share(layer, expert, fb_entries[entry.shares])
                                             if entry.shares is not None else
                                             fb_writer.write(layer, expert, infos[fb_fmt.name],
                                                             _encode(fb_fmt, infos[fb_fmt.name], got, dt, H, I, where)))
                del pending[(layer, expert)]
                wanted.discard((layer, expert))
        bar.close()
        store_bytes = writer.close()
        fallback = None
        if fb_writer is not None:
            fb_sorted = tuple(sorted(fb_writer.entries, key=lambda e: e.key))
            fallback = FallbackStore(FALLBACK_NAME, fb_writer.close(), fb_sorted)
        if wanted:
            l, e = min(wanted)
            lacking = lacking_parts(want_parts, pending.get((l, e), {}))
            raise ModelLoadError(f"{src}: layer {l} expert {e} is missing {', '.join(lacking)} weights"
                                 + (f" ({len(wanted) - 1} more experts incomplete)" if len(wanted) > 1 else ""))

        # Same checks as loading would do (names, shapes), so a bad checkpoint fails now.
        load_resident(ckpt.build(), tensors, str(src))
        quantized = quantize_resident(ckpt.build(), tensors, dt, resident) if resident in ("int8", "int4") else []
        int8, int4 = (quantized, []) if resident == "int8" else ([], quantized)
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
        if gguf_src is not None:
            copied += gguf_src.write_aux_files(tmp)  # config and tokenizer built from the metadata
        entries = sorted(writer.entries, key=lambda e: e.key)
        manifest = Manifest(
            store_id=store_id, model_type=args.model_type, dtype=dtype_name(dt), config=ckpt.config,
            resident_file=RESIDENT_NAME, resident_bytes=resident_bytes, resident_tensors=crcs,
            store_file=STORE_NAME, store_bytes=store_bytes,
            formats={n: infos[n] for n in sorted({e.format for e in entries} | ({fb_fmt.name} if fb_fmt else set()))},
            experts=entries, created_by=f"edgemoe {__version__}", resident_int8=int8, expert_biases=biases,
            version=manifest_version(int8, biases, any(e.shares is not None for e in entries), fallback is not None,
                                     int4),
            fallback=fallback, resident_int4=int4,
        )
        manifest.write(tmp / MANIFEST_NAME)
        _fsync_dir(tmp)
        _crash_point("complete")
        _install(tmp, out)
    except BaseException as e:
        for w in (writer, fb_writer):
            if w is not None and not w.f.closed:
                w.f.close()
        _remove(tmp)
        if isinstance(e, OSError):  # disk full, permissions, ...: one line naming the file
            raise EdgeMoEError(f"{e.filename or tmp}: {e.strerror or e}; the conversion to {out} was abandoned") from None
        raise
    return ConvertResult(
        out=out, model_type=args.model_type, dtype=dtype_name(dt), resident_bytes=resident_bytes,
        store_bytes=store_bytes, experts=len(entries), formats=dict(Counter(e.format for e in entries)),
        seconds=time.perf_counter() - t0, baseline_rss_bytes=baseline, peak_rss_bytes=peak_rss_bytes(),
        source_bytes=source_bytes, copied=copied, resident_int8=int8, resident_int4=int4, recovered=recovered,
        added_error=gguf_src.added_error() if gguf_src is not None else {},
        fallback_format=fb_fmt.name if fb_fmt is not None else None,
        fallback_bytes=fallback.bytes if fallback is not None else 0,
    )
