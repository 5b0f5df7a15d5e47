"""Reading and writing safetensors files with plain `pread`/`write`, never `mmap`.

The `safetensors` library maps the whole file; every page a tensor copy touches then
counts in the process's resident set until the file is closed, so reading a 5 GB shard
tensor by tensor shows 5 GB of RSS. Under a hard memory budget (and for a converter that
must stay well under the model size) that is not acceptable. The file format is simple:

    u64 little-endian N | N bytes of JSON header | tensor data

The header maps names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the data section) plus an optional "__metadata__" of strings. Files written
here are readable by the `safetensors` library and vice versa.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import torch

from ..errors import EdgeMoEError

DTYPE_CODES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODE_OF = {v: k for k, v in DTYPE_CODES.items()}

MAX_HEADER = 100 << 20  # the reference implementation's limit
_CHUNK = 1 << 30  # one pread call reads at most this much (Linux caps a call at ~2 GiB)


class TensorFileError(EdgeMoEError):
    """A safetensors file is malformed; callers re-raise it as their own error type."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int


def element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def read_header(path: str | Path, f: BinaryIO | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header: returns ({name: TensorInfo}, metadata). Every
    offset is checked against the file size, so a truncated or garbled file fails here."""
    path = Path(path)
    own = f is None
    if own:
        if path.exists() and not path.is_file():  # a directory, or a named pipe that would block forever
            raise TensorFileError(f"{path}: not a regular file")
        f = open(path, "rb")
    try:
        size = os.fstat(f.fileno()).st_size
        raw = os.pread(f.fileno(), 8, 0)
        if len(raw) < 8:
            raise TensorFileError(f"{path}: too short for a safetensors file ({size} bytes)")
        n = int.from_bytes(raw, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise TensorFileError(f"{path}: header length {n} is impossible for a {size}-byte file (truncated or corrupted?)")
        try:
            header = json.loads(os.pread(f.fileno(), n, 8).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise TensorFileError(f"{path}: header is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
        if not isinstance(header, dict):
            raise TensorFileError(f"{path}: header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise TensorFileError(f"{path}: __metadata__ is not an object")
        data_start = 8 + n
        infos: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            infos[name] = _parse_entry(path, name, entry, data_start, size)
        return infos, meta
    except OSError as e:
        raise TensorFileError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        if own:
            f.close()


def _parse_entry(path: Path, name: str, entry, data_start: int, size: int) -> TensorInfo:
    bad = f"{path}: tensor {name!r} has a malformed header entry"
    if not isinstance(entry, dict):
        raise TensorFileError(bad)
    dtype = DTYPE_CODES.get(entry.get("dtype"))
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise TensorFileError(f"{path}: tensor {name!r} has unknown dtype {entry.get('dtype')!r}")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise TensorFileError(bad + f" (shape {shape!r})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise TensorFileError(bad + f" (data_offsets {offsets!r})")
    begin, end = offsets
    numel = 1
    for s in shape:
        numel *= s
    if not 0 <= begin <= end or end - begin != numel * element_size(dtype):
        raise TensorFileError(f"{path}: tensor {name!r}: data_offsets {offsets} do not match shape {shape} and dtype")
    if data_start + end > size:
        raise TensorFileError(f"{path}: tensor {name!r} extends past the end of the file (truncated?)")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, end - begin)


def pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill `buf` from `offset`, looping over short reads; returns bytes read (less than
    len(buf) only at end of file). `os.preadv` releases the GIL while it waits."""
    done, total = 0, len(buf)
    while done < total:
        n = os.preadv(fd, [buf[done : done + _CHUNK]], offset + done)
        if n == 0:
            break
        done += n
    return done


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def read_tensor(fd: int, info: TensorInfo, path: str | Path = "") -> torch.Tensor:
    """Read one tensor into a fresh tensor (no mmap, no intermediate copy)."""
    t = torch.empty(info.shape, dtype=info.dtype)
    try:
        got = pread_into(fd, tensor_bytes(t), info.start)
    except OSError as e:
        raise TensorFileError(f"{path}: cannot read tensor {info.name!r}: {e.strerror or e}") from None
    if got != info.nbytes:
        raise TensorFileError(f"{path}: tensor {info.name!r} is cut short (truncated file?)")
    return t


def iter_tensors(path: str | Path, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for the named tensors (all of them by default), in file order."""
    path = Path(path)
    with open(path, "rb") as f:
        infos, _ = read_header(path, f)
        wanted = list(infos) if names is None else list(names)
        missing = [n for n in wanted if n not in infos]
        if missing:
            raise TensorFileError(f"{path}: tensor {missing[0]!r} is not in the file")
        for name in sorted(wanted, key=lambda n: infos[n].start):
            yield name, read_tensor(f.fileno(), infos[name], path)


def crc32_of(t: torch.Tensor) -> int:
    return zlib.crc32(tensor_bytes(t.contiguous()))


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                  align: int = 4096) -> int:
    """Write tensors in safetensors layout, one at a time from their own memory (no
    serialised copy of the whole dict). The header is padded with spaces so that the
    data section starts on an `align` boundary. Returns the file size."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": CODE_OF[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    text = json.dumps(header, separators=(",", ":")).encode()
    padded = -(-(8 + len(text)) // align) * align - 8
    text += b" " * (padded - len(text))
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for t in tensors.values():
            f.write(tensor_bytes(t.contiguous()))
        f.flush()
        os.fsync(f.fileno())
        return f.tell()
