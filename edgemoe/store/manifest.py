"""On-disk layout of a converted model, its versioned manifest, and the bitwidth plan.

A directory written by `edgemoe convert`:

    manifest.json          what everything else is (this module); written last
    resident.safetensors   non-expert weights (embeddings, attention, norms, routers, shared experts)
    experts.bin            a 4 KiB header, then one 4 KiB-aligned blob per routed expert
    config.json, tokenizer files   copied from the source checkpoint

Manifest, version 1 (all sizes and offsets in bytes):

    {
      "format": "edgemoe-converted-model", "version": 1, "created_by": "edgemoe 0.1.0",
      "store_id": "<32 hex digits, also written in the experts.bin header>",
      "model_type": "mixtral", "dtype": "bfloat16",          # resident weights / compute dtype
      "config": {... the checkpoint's config.json ...},
      "alignment": 4096,
      "resident": {"file": "resident.safetensors", "bytes": N,
                   "tensors": {"<name>": {"crc32": C}, ...},
                   "int8": ["layers.0.attn.q", ...]},        # version 2 only, see below
                   (or "int4": [...], version 6)
      "store": {"file": "experts.bin", "bytes": N, "header_bytes": 4096},
      "formats": {"bf16": {"tag": "", "bits": 16.0, "bytes": B,      # B = payload bytes of one expert
                           "parts": [{"name": "w13", "dtype": "bfloat16", "shape": [2I, H], "offset": 0}, ...]}},
      "experts": [{"layer": 0, "expert": 0, "format": "bf16", "offset": 4096, "size": B, "crc32": C}, ...],
      "checksum": <crc32 of the canonical JSON of every other key>
    }

An expert's blob is `size` payload bytes at `offset` (a multiple of 4096), zero-padded to
the next multiple of 4096 so that it can be read with O_DIRECT. Inside a blob the
format's tensors follow each other at 64-byte aligned offsets. crc32 covers the payload.
The manifest carries its own checksum so that a damaged manifest is refused instead of
silently describing a different model.

Version 2 is version 1 plus `resident.int8`: resident linear layers stored as int8 codes
`<name>.qweight` and scales `<name>.scale` instead of `<name>.weight` (`edgemoe convert
--resident int8`, see quant/resident.py). It is written only when that list is not empty,
so a reader that knows only version 1 refuses such a model instead of misloading it.

Version 3 is version 2 plus `expert_biases`, for models whose experts carry biases
(gpt-oss): every expert blob holds, after its format's tensors, float bias tensors
"b13" (2I,: gate then up) and "b2" (H,), listed in each format's "parts" like the others,
in the compute dtype (float formats: in their own type, which their matmuls produce).

      "expert_biases": {"dtype": "bfloat16", "parts": ["b13", "b2"]}

It is written only when the experts have biases (older readers refuse the model rather
than run it without them); stores without the key load as before.

Version 4 adds `shares` to an expert entry: [layer, expert] of the entry whose blob it uses
(identical experts, e.g. a merged group, are stored and cached once).

Version 5 adds `fallback` (`edgemoe convert --fallback-bits 2|3`): a second, small copy
of every expert in a second store file (same 4 KiB header and blob layout as experts.bin),
which the runtime may read instead of the full copy on a miss of an expert with a low
routing weight (`--fallback-below`, see runtime/fallback.py). Its formats are described
in "formats" with the others; its entries are like "experts" entries, one per expert, and
an expert that shares a blob shares its fallback blob with the same owner.

      "fallback": {"file": "experts.fallback.bin", "bytes": N, "header_bytes": 4096,
                   "experts": [{"layer": 0, "expert": 0, "format": "int2", "offset": 4096,
                                "size": B, "crc32": C}, ...]}

Version 6 adds `resident.int4` (`edgemoe convert --resident int4`, see quant/resident.py):
resident linear layers stored as the experts' int4 layout, packed codes `<name>.qweight`
(N, Kp/2) uint8 and group scales `<name>.qscale` (N, Kp/64) fp16, instead of
`<name>.weight`. It is written only when that list is not empty (older readers refuse the
model instead of misloading it); a layer is in at most one of `int8` and `int4`.

Plan, version 1 (`edgemoe convert --plan PLAN.json`): which storage format each expert gets.

    {"version": 1, "default": "bf16", "layers": {"3": "int8"}, "experts": {"3.5": "int4"}}

"experts" (keys "<layer>.<expert>") wins over "layers", which wins over "default".
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import EdgeMoEError, StoreError
from ..jsonfile import read_json
from ..quant.formats import BIAS_PARTS, Format, TensorSpec, get_format
from .names import CONVERTED_NAMES, MANIFEST_NAME, RESIDENT_NAME, STORE_NAME, is_converted  # noqa: F401 (re-exported)

FALLBACK_NAME = "experts.fallback.bin"  # the small copies' store file (version 5)

MANIFEST_FORMAT = "edgemoe-converted-model"
MANIFEST_VERSION = 6  # the newest version this edgemoe reads; it writes the oldest that describes the model
PLAN_VERSION = 1
ALIGN = 4096  # blob offsets, blob lengths and cache slots: what O_DIRECT needs
PART_ALIGN = 64  # tensors inside a blob: a cache line, enough for any SIMD kernel
STORE_MAGIC = b"EDGEMOE-EXPERT-STORE"
HEADER_BYTES = ALIGN

_DTYPE_NAMES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "uint16": torch.uint16, "uint32": torch.uint32,
}


# What the manifest's "dtype" (resident weights and compute) may be.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, source: str) -> torch.dtype:
    if name not in _DTYPE_NAMES:
        raise StoreError(f"{source}: unknown dtype {name!r}")
    return _DTYPE_NAMES[name]


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


# ----------------------------------------------------------------------------- blobs


@dataclass(frozen=True)
class BlobPart:
    """One tensor of an expert blob and where it sits inside the blob."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return TensorSpec(self.name, self.dtype, self.shape).nbytes

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": dtype_name(self.dtype), "shape": list(self.shape), "offset": self.offset}


def blob_layout(specs: list[TensorSpec]) -> tuple[list[BlobPart], int]:
    """Place a format's tensors one after another at PART_ALIGN boundaries; returns the
    parts and the payload size."""
    parts, pos = [], 0
    for s in specs:
        pos = round_up(pos, PART_ALIGN)
        parts.append(BlobPart(s.name, s.dtype, tuple(s.shape), pos))
        pos += s.nbytes
    return parts, pos


@dataclass(frozen=True)
class FormatInfo:
    """A storage format as recorded in the manifest."""

    name: str
    tag: str
    bits: float
    parts: tuple[BlobPart, ...]
    size: int  # payload bytes of one expert

    @classmethod
    def of(cls, fmt: Format, hidden: int, inter: int, biases: "ExpertBiases | None" = None) -> "FormatInfo":
        """The blob layout of `fmt` for experts of this shape, with the bias tensors after
        the format's own when the experts have biases."""
        specs = fmt.layout(hidden, inter)
        if biases is not None:
            specs = specs + fmt.bias_layout(hidden, inter, fmt.bias_dtype(biases.dtype), biases.parts)
        parts, size = blob_layout(specs)
        return cls(fmt.name, fmt.tag(), round(fmt.bits_per_weight(hidden, inter), 4), tuple(parts), size)

    def to_dict(self) -> dict:
        return {"tag": self.tag, "bits": self.bits, "bytes": self.size, "parts": [p.to_dict() for p in self.parts]}


@dataclass(frozen=True)
class ExpertBiases:
    """Which bias tensors every expert blob carries (version 3), and the compute dtype
    they are stored in (float formats keep them in their own type: `Format.bias_dtype`)."""

    dtype: torch.dtype
    parts: tuple[str, ...]  # a subset of BIAS_PARTS, in that order

    def to_dict(self) -> dict:
        return {"dtype": dtype_name(self.dtype), "parts": list(self.parts)}


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ExpertEntry:
    layer: int
    expert: int
    format: str
    offset: int  # in the store file, a multiple of ALIGN
    size: int  # payload bytes (the checksum covers these)
    crc32: int
    # (layer, expert) whose blob this entry uses (version 4): identical experts, e.g. the
    # members of a merged group, are stored once; None: the entry owns its blob.
    shares: tuple[int, int] | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.expert)

    @property
    def blob_key(self) -> tuple[int, int]:
        """The key of the entry that owns this entry's blob (itself unless shared)."""
        return self.shares if self.shares is not None else self.key

    @property
    def length(self) -> int:
        """Bytes read from storage and held in the cache: the payload padded to ALIGN."""
        return round_up(self.size)

    @property
    def name(self) -> str:
        return f"layer {self.layer} expert {self.expert}"

    def to_dict(self) -> dict:
        d = {"layer": self.layer, "expert": self.expert, "format": self.format, "offset": self.offset,
             "size": self.size, "crc32": self.crc32}
        if self.shares is not None:
            d["shares"] = list(self.shares)
        return d


@dataclass(frozen=True)
class FallbackStore:
    """The small copy of every expert (version 5): a second store file and its entries,
    whose formats are described in the manifest's "formats" with the others."""

    file: str
    bytes: int
    experts: tuple[ExpertEntry, ...]

    def table(self) -> dict[tuple[int, int], ExpertEntry]:
        return {e.key: e for e in self.experts}

    def to_dict(self) -> dict:
        return {"file": self.file, "bytes": self.bytes, "header_bytes": HEADER_BYTES,
                "experts": [e.to_dict() for e in self.experts]}


@dataclass
class Manifest:
    store_id: str
    model_type: str
    dtype: str
    config: dict
    resident_file: str
    resident_bytes: int
    resident_tensors: dict[str, int]  # name -> crc32
    store_file: str
    store_bytes: int
    formats: dict[str, FormatInfo]
    experts: list[ExpertEntry]
    created_by: str = ""
    resident_int8: list[str] = field(default_factory=list)  # resident linear layers stored as int8 (version 2)
    expert_biases: ExpertBiases | None = None  # bias tensors in every expert blob (version 3)
    version: int = 1
    path: Path | None = field(default=None, compare=False)
    fallback: FallbackStore | None = None  # small copies of the experts (version 5)
    resident_int4: list[str] = field(default_factory=list)  # resident linear layers stored as int4 (version 6)

    # --- derived views

    def table(self) -> dict[tuple[int, int], ExpertEntry]:
        return {e.key: e for e in self.experts}

    @property
    def expert_bytes(self) -> int:
        """Bytes the experts take in a cache (padded blobs; a shared blob counts once)."""
        return sum(e.length for e in self.experts if e.shares is None)

    def to_dict(self) -> dict:
        body = {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "created_by": self.created_by,
            "store_id": self.store_id,
            "model_type": self.model_type,
            "dtype": self.dtype,
            "config": self.config,
            "alignment": ALIGN,
            "resident": {"file": self.resident_file, "bytes": self.resident_bytes,
                         "tensors": {k: {"crc32": v} for k, v in self.resident_tensors.items()},
                         **({"int8": list(self.resident_int8)} if self.resident_int8 else {}),
                         **({"int4": list(self.resident_int4)} if self.resident_int4 else {})},
            "store": {"file": self.store_file, "bytes": self.store_bytes, "header_bytes": HEADER_BYTES},
            "formats": {k: v.to_dict() for k, v in self.formats.items()},
            "experts": [e.to_dict() for e in self.experts],
        }
        if self.expert_biases is not None:
            body["expert_biases"] = self.expert_biases.to_dict()
        if self.fallback is not None:
            body["fallback"] = self.fallback.to_dict()
        body["checksum"] = _checksum(body)
        return body

    def write(self, path: Path) -> None:
        """Write as readable JSON: one line per expert keeps big manifests diffable."""
        d = self.to_dict()
        experts = d.pop("experts")
        checksum = d.pop("checksum")
        fallback = d.pop("fallback", None)
        text = json.dumps(d, indent=1)[:-2]

        def rows(entries: list[dict], indent: str) -> str:
            return ",\n".join(indent + json.dumps(e, separators=(", ", ": ")) for e in entries)

        text += f',\n "experts": [\n{rows(experts, "  ")}\n ]'
        if fallback is not None:
            fb = fallback.pop("experts")
            head = json.dumps(fallback, separators=(", ", ": "))[:-1]
            text += f',\n "fallback": {head}, "experts": [\n{rows(fb, "   ")}\n ]}}'
        text += f',\n "checksum": {checksum}\n}}\n'
        with open(path, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _checksum(body: dict) -> int:
    """crc32 of the canonical JSON (sorted keys, no spaces) of everything but "checksum"."""
    canon = json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return zlib.crc32(canon.encode())


def read_manifest(directory: str | Path) -> Manifest:
    """Load and validate `directory/manifest.json`. Every inconsistency is a StoreError
    naming the file (and the layer and expert, for per-expert problems)."""
    path = Path(directory) / MANIFEST_NAME
    src = str(path)
    if not path.exists():
        raise StoreError(f"{src}: missing (not a directory written by 'edgemoe convert'?)")
    if not path.is_file():  # a directory or a named pipe (which would block the read forever)
        raise StoreError(f"{src}: not a regular file; re-run 'edgemoe convert'")
    data = read_json(path, StoreError, "not valid JSON ({e}); the manifest is corrupted, re-run 'edgemoe convert'")
    if data.get("format") != MANIFEST_FORMAT:
        raise StoreError(f"{src}: not an edgemoe manifest (format {data.get('format')!r})")
    version = data.get("version")
    if not isinstance(version, int) or version < 1:
        raise StoreError(f"{src}: invalid version {version!r}")
    if version > MANIFEST_VERSION:
        raise StoreError(f"{src}: manifest version {version} is newer than this edgemoe supports "
                         f"({MANIFEST_VERSION}); upgrade edgemoe or re-convert")
    if data.get("checksum") != _checksum(data):
        raise StoreError(f"{src}: checksum mismatch; the manifest is corrupted or was edited, re-run 'edgemoe convert'")
    try:
        return _parse(data, path)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StoreError(f"{src}: malformed manifest ({type(e).__name__}: {e})") from None


def _int(v, what: str, src: str, minimum: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise StoreError(f"{src}: {what} must be an integer >= {minimum}, got {v!r}")
    return v


def _parse(d: dict, path: Path) -> Manifest:
    src = str(path)
    if d.get("alignment") != ALIGN:
        raise StoreError(f"{src}: alignment {d.get('alignment')!r} is not supported (expected {ALIGN})")
    res, store = d["resident"], d["store"]
    if store.get("header_bytes") != HEADER_BYTES:
        raise StoreError(f"{src}: store header size {store.get('header_bytes')!r} is not supported")
    formats = {}
    for name, f in d["formats"].items():
        parts = tuple(
            BlobPart(p["name"], dtype_from_name(p["dtype"], src), tuple(_int(s, "shape", src) for s in p["shape"]),
                     _int(p["offset"], "part offset", src))
            for p in f["parts"]
        )
        formats[name] = FormatInfo(name, str(f["tag"]), float(f["bits"]), parts, _int(f["bytes"], "format bytes", src))
    store_bytes = _int(store["bytes"], "store bytes", src)
    experts = _entries(d["experts"], formats, store_bytes, d["version"], src)
    fallback = _fallback(d["fallback"], formats, experts, src) if d["version"] >= 5 and "fallback" in d else None
    tensors = {k: _int(v["crc32"], f"crc32 of {k}", src) for k, v in res["tensors"].items()}
    int8 = res.get("int8", []) if d["version"] >= 2 else []
    biases = _biases(d.get("expert_biases"), src) if d["version"] >= 3 else None
    if not isinstance(int8, list) or not all(isinstance(n, str) and n for n in int8):
        raise StoreError(f"{src}: resident.int8 must be a list of layer names")
    int4 = res.get("int4", []) if d["version"] >= 6 else []
    if not isinstance(int4, list) or not all(isinstance(n, str) and n for n in int4):
        raise StoreError(f"{src}: resident.int4 must be a list of layer names")
    both = sorted(set(int8) & set(int4))
    if both:
        raise StoreError(f"{src}: resident layer {both[0]!r} is listed as both int8 and int4")
    if not isinstance(d["model_type"], str):
        raise StoreError(f"{src}: model_type must be a string, got {d['model_type']!r}")
    config = d["config"]
    if not isinstance(config, dict) or config.get("model_type") != d["model_type"]:
        raise StoreError(f"{src}: config does not match model_type {d['model_type']!r}")
    if d["dtype"] not in COMPUTE_DTYPES:
        raise StoreError(f"{src}: dtype {d['dtype']!r} is not a compute dtype (expected one of "
                         f"{', '.join(COMPUTE_DTYPES)}); re-run 'edgemoe convert'")
    return Manifest(
        store_id=str(d["store_id"]), model_type=str(d["model_type"]), dtype=str(d["dtype"]), config=config,
        resident_file=_filename(res["file"], src), resident_bytes=_int(res["bytes"], "resident bytes", src),
        resident_tensors=tensors, store_file=_filename(store["file"], src), store_bytes=store_bytes,
        formats=formats, experts=experts, created_by=str(d.get("created_by", "")), resident_int8=int8,
        expert_biases=biases, version=d["version"], path=path, fallback=fallback, resident_int4=int4,
    )


def _entries(raw, formats: dict[str, FormatInfo], store_bytes: int, version: int, src: str,
             what: str = "") -> list[ExpertEntry]:
    """The expert entries of one store file, checked against its formats and size, for
    duplicates, overlaps and sharing. `what` prefixes per-entry errors ("fallback ")."""
    experts = []
    for e in raw:
        shares = e.get("shares") if version >= 4 else None
        if shares is not None:
            if not (isinstance(shares, list) and len(shares) == 2):
                raise StoreError(f"{src}: layer {e.get('layer')} expert {e.get('expert')}: shares must be "
                                 f"[layer, expert], got {shares!r}")
            shares = (_int(shares[0], "shares layer", src), _int(shares[1], "shares expert", src))
        entry = ExpertEntry(_int(e["layer"], "layer", src), _int(e["expert"], "expert", src), str(e["format"]),
                            _int(e["offset"], "offset", src), _int(e["size"], "size", src, 1),
                            _int(e["crc32"], "crc32", src), shares)
        where = f"{src}: {what}{entry.name}"
        if entry.format not in formats:
            raise StoreError(f"{where}: format {entry.format!r} is not described in the manifest")
        if entry.size != formats[entry.format].size:
            raise StoreError(f"{where}: size {entry.size} does not match format {entry.format} "
                             f"({formats[entry.format].size} bytes)")
        if entry.offset % ALIGN or entry.offset < HEADER_BYTES:
            raise StoreError(f"{where}: offset {entry.offset} is not a {ALIGN}-byte aligned position after the header")
        if entry.offset + entry.length > store_bytes:
            raise StoreError(f"{where}: blob ends past the end of the store ({store_bytes} bytes)")
        experts.append(entry)
    seen: dict[tuple[int, int], ExpertEntry] = {}
    for e in experts:
        if e.key in seen:
            raise StoreError(f"{src}: {what}{e.name} is listed twice")
        seen[e.key] = e
    for e in experts:
        if e.shares is None:
            continue
        owner = seen.get(e.shares)
        if owner is None or owner.shares is not None or e.shares == e.key:
            raise StoreError(f"{src}: {what}{e.name} shares the blob of layer {e.shares[0]} expert {e.shares[1]}, "
                             "which is not an expert with its own blob")
        if (owner.format, owner.offset, owner.size, owner.crc32) != (e.format, e.offset, e.size, e.crc32):
            raise StoreError(f"{src}: {what}{e.name} shares the blob of {owner.name} but lists another format, "
                             "offset, size or checksum")
    by_offset = sorted((e for e in experts if e.shares is None), key=lambda e: e.offset)
    for a, b in zip(by_offset, by_offset[1:]):
        if a.offset + a.length > b.offset:
            raise StoreError(f"{src}: {what}{a.name} and {b.name} overlap in the store")
    return experts


def _fallback(value, formats: dict[str, FormatInfo], experts: list[ExpertEntry], src: str) -> FallbackStore:
    """The fallback store (version 5): one small copy per expert, shared exactly where the
    full copies are."""
    if not isinstance(value, dict) or not isinstance(value.get("experts"), list):
        raise StoreError(f"{src}: fallback must be an object with an 'experts' list")
    if value.get("header_bytes") != HEADER_BYTES:
        raise StoreError(f"{src}: fallback store header size {value.get('header_bytes')!r} is not supported")
    size = _int(value.get("bytes"), "fallback bytes", src)
    entries = _entries(value["experts"], formats, size, 5, src, "fallback of ")
    table = {e.key: e for e in entries}
    for e in experts:
        fb = table.pop(e.key, None)
        if fb is None:
            raise StoreError(f"{src}: {e.name} has no fallback copy; re-run 'edgemoe convert'")
        if fb.shares != e.shares:
            raise StoreError(f"{src}: fallback of {e.name} shares {fb.shares}, its full copy {e.shares}: "
                             "experts that share a blob share their fallback")
    if table:
        raise StoreError(f"{src}: fallback of {min(table.values(), key=lambda e: e.key).name} belongs to no expert")
    return FallbackStore(_filename(value.get("file"), src), size, tuple(entries))


def _biases(value, src: str) -> ExpertBiases | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("parts"), list):
        raise StoreError(f"{src}: expert_biases must be an object with a 'parts' list")
    parts = value["parts"]
    if not parts or [p for p in BIAS_PARTS if p in parts] != parts:
        raise StoreError(f"{src}: expert_biases.parts {parts!r} must be a non-empty ordered subset of "
                         f"{list(BIAS_PARTS)}")
    dtype = dtype_from_name(value.get("dtype"), src) if isinstance(value.get("dtype"), str) else None
    if dtype is None or not dtype.is_floating_point:
        raise StoreError(f"{src}: expert_biases.dtype must name a float type, got {value.get('dtype')!r}")
    return ExpertBiases(dtype, tuple(parts))


def manifest_version(resident_int8: list[str], biases: ExpertBiases | None, shared: bool = False,
                     fallback: bool = False, resident_int4: list[str] | tuple = ()) -> int:
    """The oldest manifest version that describes a model (so older readers load what
    they can and refuse what they would misread)."""
    if resident_int4:
        return 6
    return 5 if fallback else 4 if shared else 3 if biases is not None else 2 if resident_int8 else 1


def _filename(name, src: str) -> str:
    """File names in the manifest are plain names inside the model directory."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise StoreError(f"{src}: invalid file name {name!r}")
    return name


def store_header(store_id: str) -> bytes:
    """The first HEADER_BYTES of experts.bin: magic, manifest version and store id, so that
    a store file from another conversion is recognised as such before any expert is read."""
    text = STORE_MAGIC + b"\n" + json.dumps({"version": MANIFEST_VERSION, "store_id": store_id}).encode() + b"\n"
    return text + b"\0" * (HEADER_BYTES - len(text))


def parse_store_header(raw: bytes, src: str) -> str:
    """The store id recorded in a store file header."""
    if not raw.startswith(STORE_MAGIC + b"\n"):
        raise StoreError(f"{src}: not an edgemoe expert store (bad magic); re-run 'edgemoe convert'")
    try:
        line = raw[len(STORE_MAGIC) + 1 :].split(b"\n", 1)[0]
        return str(json.loads(line.decode())["store_id"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise StoreError(f"{src}: store header is corrupted; re-run 'edgemoe convert'") from None


# ----------------------------------------------------------------------------- plan


@dataclass
class ExpertPlan:
    """Which storage format each expert gets."""

    default: str
    layers: dict[int, str] = field(default_factory=dict)
    experts: dict[tuple[int, int], str] = field(default_factory=dict)

    def format_for(self, layer: int, expert: int) -> str:
        return self.experts.get((layer, expert)) or self.layers.get(layer) or self.default

    def names(self) -> set[str]:
        return {self.default, *self.layers.values(), *self.experts.values()}

    def to_dict(self) -> dict:
        return {
            "version": PLAN_VERSION,
            "default": self.default,
            "layers": {str(k): v for k, v in sorted(self.layers.items())},
            "experts": {f"{l}.{e}": v for (l, e), v in sorted(self.experts.items())},
        }

    @classmethod
    def from_dict(cls, data, source: str) -> "ExpertPlan":
        if not isinstance(data, dict):
            raise EdgeMoEError(f"{source}: a plan is a JSON object")
        unknown = set(data) - {"version", "default", "layers", "experts", "comment", "meta"}
        if unknown:
            raise EdgeMoEError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
        if data.get("version") != PLAN_VERSION:
            raise EdgeMoEError(f"{source}: plan version {data.get('version')!r} is not supported (expected {PLAN_VERSION})")
        default = data.get("default")
        if not isinstance(default, str):
            raise EdgeMoEError(f"{source}: 'default' must name a format")
        layers, experts = {}, {}
        for k, v in (data.get("layers") or {}).items():
            if not str(k).isdigit() or not isinstance(v, str):
                raise EdgeMoEError(f"{source}: layers entry {k!r}: {v!r} should be \"<layer>\": \"<format>\"")
            layers[int(k)] = v
        for k, v in (data.get("experts") or {}).items():
            bits = str(k).split(".")
            if len(bits) != 2 or not all(b.isdigit() for b in bits) or not isinstance(v, str):
                raise EdgeMoEError(f"{source}: experts entry {k!r}: {v!r} should be \"<layer>.<expert>\": \"<format>\"")
            experts[(int(bits[0]), int(bits[1]))] = v
        return cls(default, layers, experts)

    @classmethod
    def read(cls, path: str | Path) -> "ExpertPlan":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise EdgeMoEError(f"{path}: plan file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EdgeMoEError(f"{path}: invalid JSON: {e}") from None
        return cls.from_dict(data, str(path))

    def check(self, moe_layers: list[int], experts_per_layer: int, source: str) -> None:
        """Every key must name an existing layer / expert and every format must exist."""
        layer_set = set(moe_layers)
        for l in self.layers:
            if l not in layer_set:
                raise EdgeMoEError(f"{source}: layer {l} has no routed experts in this model")
        for l, e in self.experts:
            if l not in layer_set or not 0 <= e < experts_per_layer:
                raise EdgeMoEError(f"{source}: there is no layer {l} expert {e} in this model")
        for name in sorted(self.names()):
            try:
                get_format(name)
            except EdgeMoEError as err:
                raise EdgeMoEError(f"{source}: {err}") from None
