"""Opening a converted model: the resident weights and the expert store.

`ExpertStore.read_into` reads one expert blob with `pread` into caller-provided,
4 KiB-aligned memory (a slot of the cache slab). It uses O_DIRECT where the file system
supports it, so reads bypass the page cache (which would otherwise grow outside the
budget and slow compute), and falls back to buffered reads where it does not (tmpfs,
some network file systems), recording which mode is in use. Every failure names the
layer and expert and is raised as a StoreError in the calling thread.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from pathlib import Path

import torch

from ..errors import EdgeMoEError, StoreError
from ..experts import Expert
from ..quant.formats import for_experts, get_format
from ..quant.resident import kept_as_stored
from .manifest import (
    ALIGN,
    HEADER_BYTES,
    ExpertEntry,
    FormatInfo,
    Manifest,
    dtype_from_name,
    parse_store_header,
    read_manifest,
)
from .tensorfile import TensorFileError, pread_into, read_header, read_tensor
from .throttle import CHUNK, TokenBucket

O_DIRECT = getattr(os, "O_DIRECT", 0)

try:  # ISA-L's crc32 where the optional package is installed: the same checksum, 5-30x faster
    from isal.isal_zlib import crc32
    CRC32 = "isal"
except ImportError:
    from zlib import crc32
    CRC32 = "zlib"


def check_manifest(manifest: Manifest):
    """Check a parsed manifest against the model it describes and against this edgemoe:
    the config must build a model of its family, every routed expert of that model must
    be in the store exactly once, and every format must exist here with the same blob
    layout and machine tag. Returns the family's ModelArgs."""
    from ..models import get_family

    src = str(manifest.path)
    try:
        args = get_family(manifest.model_type, src).ModelArgs.from_dict(manifest.config, f"{src}: config")
    except EdgeMoEError as e:  # a config the family rejects: the manifest does not describe a model
        raise StoreError(str(e)) from None
    wanted = {(l, e) for l in args.moe_layers() for e in range(args.experts_per_layer)}
    have = {e.key for e in manifest.experts}
    if wanted - have:
        l, e = min(wanted - have)
        raise StoreError(f"{src}: layer {l} expert {e} is not in the manifest "
                         f"({len(wanted - have)} of {len(wanted)} experts missing); re-run 'edgemoe convert'")
    if have - wanted:
        l, e = min(have - wanted)
        raise StoreError(f"{src}: layer {l} expert {e} is in the manifest but not in the model's config")
    hidden, inter = args.hidden_size, args.expert_dim
    for name, info in manifest.formats.items():
        try:
            fmt = for_experts(get_format(name), args.expert_gated)  # ungated experts: the one-matrix layout
        except EdgeMoEError:
            users = [e for e in manifest.experts if e.format == name]
            first = f" (used by {users[0].name} and {len(users) - 1} more)" if users else ""
            raise StoreError(f"{src}: expert format {name!r}{first} is not known to this edgemoe") from None
        if fmt.tag() != info.tag:
            raise StoreError(f"{src}: format {name} was written with layout tag {info.tag!r}, but this machine "
                             f"uses {fmt.tag()!r}; re-run 'edgemoe convert' here")
        if FormatInfo.of(fmt, hidden, inter, manifest.expert_biases).parts != info.parts:
            raise StoreError(f"{src}: format {name}: the blob layout in the manifest does not match experts of "
                             f"hidden size {hidden} and intermediate size {inter} in this edgemoe "
                             f"(written by {manifest.created_by or 'an unknown version'}); re-run 'edgemoe convert'")
    return args


def open_regular(path: Path) -> int:
    """A read-only descriptor of a regular file. O_NONBLOCK: a named pipe in the file's
    place would otherwise block the open until some process writes to it (for regular
    files the flag changes nothing); anything but a regular file is refused (OSError)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


class ReadAborted(EdgeMoEError):
    """A background read was stopped because its expert is no longer wanted."""

    def __init__(self, message: str, bytes_read: int = 0):
        super().__init__(message)
        self.bytes_read = bytes_read


class ExpertStore:
    """An open expert store: the manifest's table plus file descriptors for reading."""

    def __init__(self, directory: str | Path, *, direct_io: bool = True, manifest: Manifest | None = None,
                 throttle: int | TokenBucket | None = None, fallback: bool = False):
        """fallback: open the small copies' store (manifest version 5) instead of the
        full one; `throttle` may then be the full store's TokenBucket (one disk, one rate)."""
        self.dir = Path(directory)
        # Bytes per second all reads share (--read-throttle), to emulate slower storage.
        self.throttle = throttle if isinstance(throttle, TokenBucket) else TokenBucket(throttle) if throttle else None
        self.manifest = manifest or read_manifest(self.dir)
        self.args = check_manifest(self.manifest)
        if fallback and self.manifest.fallback is None:
            raise StoreError(f"{self.manifest.path}: the model has no fallback copies; convert it with "
                             "'edgemoe convert --fallback-bits 2' (or 3) to use them")
        if fallback:
            self.path = self.dir / self.manifest.fallback.file
            self.entries: dict[tuple[int, int], ExpertEntry] = self.manifest.fallback.table()
            self._size = self.manifest.fallback.bytes
        else:
            self.path = self.dir / self.manifest.store_file
            self.entries = self.manifest.table()
            self._size = self.manifest.store_bytes
        self.formats = {name: (for_experts(get_format(name), self.args.expert_gated), info)
                        for name, info in self.manifest.formats.items()}
        # Where each format's tensors lie in a blob, computed once (experts are built per use).
        self._parts = {name: [(p.name, p.offset, p.offset + p.nbytes, p.dtype, tuple(p.shape)) for p in info.parts]
                       for name, info in self.manifest.formats.items()}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.read_s = 0.0
        self.reads = 0
        self._fd = self._fd_direct = -1
        self._retired: list[int] = []
        self._open(direct_io)

    # --- opening

    def _open(self, direct_io: bool) -> None:
        src = str(self.path)
        try:
            self._fd = open_regular(self.path)
        except FileNotFoundError:
            raise StoreError(f"{src}: expert store file is missing; the converted model is incomplete") from None
        except OSError as e:
            raise StoreError(f"{src}: cannot open: {e.strerror or e}") from None
        size = os.fstat(self._fd).st_size
        if size != self._size:
            # Name the first expert that the file no longer (or not yet) holds in full.
            cut = sorted((e for e in self.entries.values() if e.offset + e.length > size), key=lambda e: e.offset)
            what = f"; {cut[0].name} and {len(cut) - 1} more are cut off" if cut else ""
            kind = "truncated" if size < self._size else "larger than expected"
            self.close()
            raise StoreError(f"{src}: {kind}: {size} bytes, the manifest says {self._size}{what}")
        header = os.pread(self._fd, HEADER_BYTES, 0)
        if parse_store_header(header, src) != self.manifest.store_id:
            self.close()
            raise StoreError(f"{src}: belongs to a different conversion than {self.manifest.path}; re-run 'edgemoe convert'")
        self.io_mode = "buffered"
        if direct_io and O_DIRECT:
            try:
                self._fd_direct = os.open(self.path, os.O_RDONLY | O_DIRECT | getattr(os, "O_CLOEXEC", 0))
                self.io_mode = "direct"
            except OSError:  # tmpfs and others refuse O_DIRECT at open
                self._fd_direct = -1

    def close(self) -> None:
        for fd in (self._fd, self._fd_direct, *self._retired):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fd = self._fd_direct = -1
        self._retired = []

    # --- reading

    def read_into(self, entry: ExpertEntry, buf: memoryview, *, urgent=True, abort=None) -> float:
        """Read the padded blob of `entry` into `buf` (len >= entry.length, 4 KiB-aligned
        address for O_DIRECT). Returns the seconds spent reading. Under a read throttle the
        blob is read in chunks, urgent (demand) reads taking bandwidth first; `urgent` may
        be a callable, asked before each chunk. `abort`, a callable checked between
        chunks, may stop a background read (ReadAborted)."""
        n = entry.length
        view = buf[:n]
        t0 = time.perf_counter()
        try:
            if self.throttle is None:
                got = self._read(view, entry.offset)
            else:
                got = self._read_throttled(entry, view, urgent, abort)
        except OSError as e:
            raise StoreError(f"{self.path}: {entry.name}: read failed at offset {entry.offset}: "
                             f"{e.strerror or e}") from None
        dt = time.perf_counter() - t0
        if got < entry.size:
            raise StoreError(f"{self.path}: {entry.name}: read {got} of {entry.size} bytes at offset "
                             f"{entry.offset} (store truncated?)")
        with self._lock:
            self.bytes_read += n
            self.read_s += dt
            self.reads += 1
        return dt

    def _read_throttled(self, entry: ExpertEntry, view: memoryview, urgent: bool, abort) -> int:
        got = 0
        for start in range(0, len(view), CHUNK):
            chunk = view[start : start + CHUNK]
            self._check_abort(abort, entry, got)
            self.throttle.take(len(chunk), urgent() if callable(urgent) else urgent)
            self._check_abort(abort, entry, got)  # the wait for bandwidth can be long
            n = self._read(chunk, entry.offset + start)
            got += n
            if n < len(chunk):
                break
        return got

    def _check_abort(self, abort, entry: ExpertEntry, got: int) -> None:
        if abort is not None and abort():
            with self._lock:
                self.bytes_read += got
            raise ReadAborted(f"{self.path}: {entry.name}: background read stopped", got)

    def _read(self, view: memoryview, offset: int) -> int:
        fd = self._fd_direct
        if fd >= 0:
            try:
                return pread_into(fd, view, offset)
            except OSError as e:
                # Some file systems accept O_DIRECT at open but refuse the read; from then
                # on read through the page cache.
                if e.errno != errno.EINVAL:
                    raise
                with self._lock:
                    if self._fd_direct >= 0:
                        # Not closed here: another thread may be reading with it, and a
                        # closed number can be reused by an unrelated file.
                        self._retired.append(self._fd_direct)
                        self._fd_direct = -1
                        self.io_mode = "buffered"
        return pread_into(self._fd, view, offset)

    def verify(self, entry: ExpertEntry, buf: memoryview) -> None:
        """Compare the payload's crc32 with the manifest; raise before the expert is used."""
        crc = crc32(buf[: entry.size])
        if crc != entry.crc32:
            raise StoreError(f"{self.path}: {entry.name}: checksum mismatch (manifest {entry.crc32:#010x}, "
                             f"read {crc:#010x}); the expert store is corrupted, re-run 'edgemoe convert'")

    def expert(self, entry: ExpertEntry, blob: torch.Tensor, act: str, dtype: torch.dtype) -> Expert:
        """An Expert computing from zero-copy views into `blob` (uint8, the blob's bytes)."""
        fmt = self.formats[entry.format][0]
        parts = {name: blob[a:b].view(dt).view(shape) for name, a, b, dt, shape in self._parts[entry.format]}
        return fmt.expert(parts, act, dtype)


def read_resident(directory: str | Path, manifest: Manifest, dtype: torch.dtype | None = None,
                  fp32: set[str] | frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """Read every resident tensor into its own memory (pread, no mmap), checking each
    against the manifest's checksum. Casts to `dtype` if given and different (not the
    int4 layers' fp16 scales: quant.resident.kept_as_stored)."""
    path = Path(directory) / manifest.resident_file
    src = str(path)
    try:
        f = os.fdopen(open_regular(path), "rb")
    except FileNotFoundError:
        raise StoreError(f"{src}: resident weights file is missing; the converted model is incomplete") from None
    except OSError as e:
        raise StoreError(f"{src}: cannot open: {e.strerror or e}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size != manifest.resident_bytes:
            raise StoreError(f"{src}: {size} bytes, the manifest says {manifest.resident_bytes} (truncated or replaced?)")
        try:
            infos, _ = read_header(path, f)
        except TensorFileError as e:
            raise StoreError(f"{e}; the resident weights are corrupted, re-run 'edgemoe convert'") from None
        if set(infos) != set(manifest.resident_tensors):
            diff = sorted(set(infos) ^ set(manifest.resident_tensors))
            raise StoreError(f"{src}: tensors do not match the manifest (e.g. {diff[0]!r}); re-run 'edgemoe convert'")
        out = {}
        stored = kept_as_stored(manifest.resident_int4)
        for name in sorted(infos, key=lambda n: infos[n].start):
            try:
                t = read_tensor(f.fileno(), infos[name], path)
            except TensorFileError as e:
                raise StoreError(str(e)) from None
            crc = crc32(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            if crc != manifest.resident_tensors[name]:
                raise StoreError(f"{src}: tensor {name!r}: checksum mismatch; the resident weights are corrupted, "
                                 "re-run 'edgemoe convert'")
            want = torch.float32 if name in fp32 else dtype  # names in fp32 stay fp32 (see Transformer.fp32_names)
            if name in stored:
                want = None
            out[name] = t.to(want) if want is not None and t.is_floating_point() and t.dtype != want else t
    return out


def manifest_dtype(manifest: Manifest) -> torch.dtype:
    return dtype_from_name(manifest.dtype, str(manifest.path))


__all__ = ["ExpertStore", "read_resident", "check_manifest", "manifest_dtype", "ALIGN"]
