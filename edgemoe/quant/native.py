"""The C kernel library (csrc/): compiled on first use, cached, loaded with ctypes.

Owns the build (compiler, instruction-set variants and their flags, cache directory keyed
by the sources, the flags, the compiler and the architecture), the loading and the
ctypes signatures of the exported functions, the switch that turns the library off, and
which instruction-set variant the library runs. It does not call the kernels: kernels.py,
quantize.py and mxfp4.py do, each falling back to torch when `get()` returns None.

One shared object holds the kernels once per instruction-set variant (`VARIANTS`: generic
C, AVX2, AVX-VNNI and AVX-512 VNNI on x86-64; generic, NEON and NEON dotprod on AArch64),
each compiled with its own flags, never -march=native; csrc/dispatch.c picks the best
variant the CPU supports (CPUID / HWCAP) when the library loads. So a cached build copied
to another machine of the same architecture runs there on that machine's best variant.
`set_isa` switches to another supported variant (comparisons, tests), and
EDGEMOE_ISA=<name> picks one at load (e.g. EDGEMOE_ISA=avx2 on an AVX-512 machine).

A leaf of edgemoe.quant: it imports nothing from edgemoe.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
KERNEL_SOURCES = ("qmm.c", "qmm8.c")  # compiled once per variant
DISPATCH_SOURCE = "dispatch.c"  # compiled once, with the baseline flags of the target
DECODE_SOURCE = "decode.c"  # small decode-step ops (edgemoe/fastops.py), baseline flags too
HEADERS = ("em_common.h",)
ABI = 4  # must match EM_ABI in em_common.h and dispatch.c

# dtype codes the C functions take for their float arguments
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Variant ids as dispatch.c numbers them.
ISAS = ("generic", "avx2", "avxvnni", "avx512vnni", "neon", "dotprod")
ISA_ENV = "EDGEMOE_ISA"

_X86_V3 = ["-mavx2", "-mfma", "-mf16c"]
# Per architecture: (variant, its flags), in build order. "generic" must build; a variant
# the compiler cannot build (e.g. -mavxvnni before gcc 11) is left out with a log line.
VARIANTS = {
    "x86_64": (
        ("generic", ["-DEM_PORTABLE"]),
        ("avx2", _X86_V3),
        ("avxvnni", _X86_V3 + ["-mavxvnni"]),
        ("avx512vnni", _X86_V3 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]),
    ),
    "aarch64": (
        ("generic", ["-DEM_PORTABLE"]),
        ("neon", []),
        ("dotprod", ["-march=armv8.2-a+dotprod"]),
    ),
}
# No fast-math: the int8 activation rounding and the quantizer must round exactly.
BASE_FLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fPIC"]


def arch(machine: str | None = None) -> str:
    m = (machine or platform.machine()).lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(m, m)


def variants_for(machine: str | None = None):
    """(name, flags) of the variants built for an architecture (generic only elsewhere)."""
    return VARIANTS.get(arch(machine), (("generic", ["-DEM_PORTABLE"]),))


class Library:
    """The loaded C library, or the reason it could not be built."""

    def __init__(self):
        self.lib: ctypes.CDLL | None = None
        self.error: str | None = None
        self.path: Path | None = None
        self.disabled = False
        self._lock = threading.Lock()
        self._tried = False

    def get(self) -> ctypes.CDLL | None:
        if self.disabled:
            return None
        if not self._tried:
            with self._lock:
                if not self._tried:
                    try:
                        self.path = build()
                        self.lib = load(self.path)
                        _apply_env_isa(self.lib)
                    except Exception as e:  # noqa: BLE001 - any failure means "use the fallback"
                        self.error = " ".join(str(e).split())[:600] or repr(e)
                        log.warning(
                            "edgemoe: could not build the quantized-matmul C kernel (%s); "
                            "quantized experts fall back to torch, 5-10x slower",
                            self.error,
                        )
                    self._tried = True
        return self.lib


library = Library()


def get() -> ctypes.CDLL | None:
    """The C library (building it on first call), or None when it is off or unavailable."""
    return library.get()


def native_available() -> bool:
    """Whether the C kernel is built and loaded (building it on first call)."""
    return library.get() is not None


def native_error() -> str | None:
    """Why the C kernel is unavailable, if it is."""
    library.get()
    return library.error


def use_native(enabled: bool) -> None:
    """Turn the C kernel off (tests of the fallback, comparisons) or back on."""
    library.disabled = not enabled


# ----------------------------------------------------------------------------- variants


def isa(lib: ctypes.CDLL | None = None) -> str | None:
    """The instruction-set variant the library runs now (None without the library)."""
    lib = lib or get()
    return ISAS[lib.em_isa()] if lib is not None else None


def isa_supported(name: str, lib: ctypes.CDLL | None = None) -> bool:
    """Whether variant `name` is built and this CPU runs it."""
    lib = lib or get()
    return lib is not None and name in ISAS and bool(lib.em_isa_supported(ISAS.index(name)))


def supported_isas(lib: ctypes.CDLL | None = None) -> list[str]:
    """Every variant this machine can run, best last."""
    lib = lib or get()
    if lib is None:
        return []
    return [n for i, n in enumerate(ISAS) if lib.em_isa_supported(i)]


def best_isa(lib: ctypes.CDLL | None = None) -> str | None:
    """The variant the library picks for this CPU by itself."""
    lib = lib or get()
    return ISAS[lib.em_isa_best()] if lib is not None else None


def set_isa(name: str | None, lib: ctypes.CDLL | None = None) -> str:
    """Run variant `name` from now on (None: the best for this CPU); returns it. Raises
    ValueError for a name that is not built or that this CPU lacks."""
    lib = lib or get()
    if lib is None:
        raise RuntimeError(f"C kernel unavailable: {library.error}")
    if name is None:
        return ISAS[lib.em_set_isa(-1)]
    if name not in ISAS:
        raise ValueError(f"unknown instruction-set variant {name!r} (known: {', '.join(ISAS)})")
    if lib.em_set_isa(ISAS.index(name)) < 0:
        raise ValueError(f"variant {name!r} is not usable here (this CPU runs: {', '.join(supported_isas(lib))})")
    return name


def cpu_isas(lib: ctypes.CDLL | None = None) -> list[str]:
    """The variants this CPU's features allow, built or not (CPUID / HWCAP as dispatch.c reads them)."""
    lib = lib or get()
    if lib is None:
        return []
    mask = lib.em_cpu_mask()
    return [n for i, n in enumerate(ISAS) if mask >> i & 1]


def _apply_env_isa(lib: ctypes.CDLL) -> None:
    name = os.environ.get(ISA_ENV, "").strip().lower()
    if not name or name == "auto":
        return
    try:
        set_isa(name, lib)
    except ValueError as e:
        log.warning("edgemoe: %s=%s ignored: %s; using %s", ISA_ENV, name, e, isa(lib))


# ----------------------------------------------------------------------------- build


def cache_dir() -> Path:
    """Where compiled kernels are kept (per user, else the temporary directory)."""
    for base in (Path.home() / ".cache" / "edgemoe" / "kernels", Path(tempfile.gettempdir()) / "edgemoe-kernels"):
        try:
            base.mkdir(parents=True, exist_ok=True)
            if os.access(base, os.W_OK):
                return base
        except OSError:
            continue
    raise RuntimeError("no writable cache directory for the compiled kernel")


def cpu_id() -> str:
    """The CPU's feature flags (kernels.py reads them for its dispatch thresholds)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def compiler() -> str:
    """The C compiler kernels are built with."""
    for cc in ("cc", "gcc", "clang"):
        path = shutil.which(cc)
        if path:
            return path
    raise RuntimeError("no C compiler found (install gcc)")


def sources_digest() -> bytes:
    h = hashlib.sha256()
    for name in (*HEADERS, *KERNEL_SOURCES, DISPATCH_SOURCE, DECODE_SOURCE):
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    return h.digest()


def _run_all(cmds: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Run compile commands concurrently (a few at a time)."""
    out: list = [None] * len(cmds)
    limit = max(1, min(4, os.cpu_count() or 1))
    running: list[tuple[int, subprocess.Popen]] = []
    todo = list(enumerate(cmds))
    while todo or running:
        while todo and len(running) < limit:
            i, cmd = todo.pop(0)
            running.append((i, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        i, p = running.pop(0)
        try:
            so, se = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        out[i] = subprocess.CompletedProcess(p.args, p.returncode, so, se)
    return out


def compile_objects(cc: str, workdir: Path, variants, flags: list[str], extra: dict | None = None):
    """Compile every kernel source once per variant into workdir. Returns (built variant
    names, {variant: error}, object paths). `extra` adds flags to named variants (tests)."""
    extra = extra or {}
    jobs, names = [], []
    for name, vflags in variants:
        for src in KERNEL_SOURCES:
            obj = workdir / f"{name}-{src}.o"
            cmd = [cc, *flags, *vflags, *extra.get(name, []), f"-DEM_VARIANT={name}", "-c", str(CSRC / src),
                   "-o", str(obj)]
            jobs.append(cmd)
            names.append((name, obj))
    results = _run_all(jobs)
    failed: dict[str, str] = {}
    for (name, _), res in zip(names, results):
        if res.returncode != 0 and name not in failed:
            failed[name] = " ".join(res.stderr.split())[-300:]
    built = [n for n, _ in variants if n not in failed]
    objs = [obj for (name, obj) in names if name in built]
    return built, failed, objs


def build(variants=None, extra: dict | None = None, cc: str | None = None) -> Path:
    """Compile the kernels (or find them in the cache): every variant of `variants`
    (default: this architecture's), the dispatcher, linked into one shared object; with
    OpenMP when the compiler has it. `extra` adds flags to named variants (tests)."""
    cc = cc or compiler()
    variants = tuple(variants or variants_for())
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    out_dir = cache_dir()
    errors = []
    for openmp in (["-fopenmp"], []):
        flags = BASE_FLAGS + openmp
        desc = repr((variants, extra, flags, version, arch(), ABI)).encode()
        key = hashlib.sha256(sources_digest() + desc).hexdigest()[:16]
        lib = out_dir / f"qmm-{key}.so"
        if lib.exists():
            return lib
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmpd:
            tmp = Path(tmpd)
            built, failed, objs = compile_objects(cc, tmp, variants, flags, extra)
            if "generic" not in built:
                errors.append(f"[{' '.join(flags)}] {failed.get('generic', '')}")
                continue
            for name, err in failed.items():
                log.info("edgemoe: kernel variant %s left out of the build: %s", name, err)
            have = [f"-DEM_HAVE_{n}" for n in built if n != "generic"]
            disp, dec = tmp / "dispatch.o", tmp / "decode.o"
            res = _run_all([[cc, *flags, *have, "-c", str(CSRC / DISPATCH_SOURCE), "-o", str(disp)],
                            [cc, *flags, "-c", str(CSRC / DECODE_SOURCE), "-o", str(dec)]])
            bad = [r for r in res if r.returncode != 0]
            if bad:
                errors.append(f"[dispatch {' '.join(flags)}] {' '.join(bad[0].stderr.split())[-300:]}")
                continue
            so = tmp / "lib.so"
            res = _run_all([[cc, *flags, "-shared", "-o", str(so), str(disp), str(dec), *map(str, objs), "-lm"]])[0]
            if res.returncode != 0:
                errors.append(f"[link {' '.join(flags)}] {' '.join(res.stderr.split())[-300:]}")
                continue
            os.replace(so, lib)  # atomic: concurrent builders never see a partial file
            return lib
    raise RuntimeError("C kernel failed to compile: " + " | ".join(errors))


def load(path: Path) -> ctypes.CDLL:
    """Load a built library, check its ABI and declare the exported functions."""
    lib = ctypes.CDLL(str(path))
    if lib.em_abi() != ABI:
        raise RuntimeError(f"{path} has ABI {lib.em_abi()}, expected {ABI}")
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    qmm_args = [ptr, i32, i64, i64, ptr, ptr, i32, i32, ptr, i64, i64, i32, i64, ptr, i32, i32]
    mx_args = [ptr, i32, i64, i64, ptr, ptr, i64, i64, ptr, i32, i32]
    for fn, args in (
        ("em_qmm", qmm_args),
        ("em_qmm8", qmm_args),
        ("em_dequant", [ptr, ptr, ptr, i64, i64, i64, i64, i32, i64, ptr, i32, i32]),
        ("em_dequant8", [ptr, ptr, i32, i64, i64, i64, ptr, i32, i32]),
        ("em_rmsnorm", [ptr, i32, i64, i64, ptr, ctypes.c_float, ptr]),
        ("em_attend1", [ptr, ptr, ptr, i32, ptr, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_float, ptr, i32]),
        ("em_attn_half1", [ptr, i32, i64, ptr, ctypes.c_float, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64,
                           ctypes.c_float, ptr, i32]),
        ("em_route_softmax", [ptr, i32, i64, i64, ptr, i64, i64, i32, ptr, ptr, ptr]),
        ("em_combine1", [ptr, ptr, i32, i64, i64, ptr, ptr]),
        ("em_glu", [ptr, i64, i64, i32, ptr, i32, i32]),
        ("em_quantize", [ptr, i64, i64, i64, i32, i64, i32, i32, ptr, ptr, ptr, i32]),
        ("em_mxfp4_mm", mx_args),
        ("em_mxfp4_mm8", mx_args),
        ("em_mxfp4_dequant", [ptr, ptr, i64, i64, i64, i64, ptr, i32, i32]),
        ("em_x8_order", [i32, i32, ptr]),
        ("em_expert8", [ptr, i32, i64, i64, i64, ptr, ptr, i32, ptr, i32, i32]),
        ("em_set_isa", [i32]),
        ("em_isa_supported", [i32]),
        ("em_isa_built", [i32]),
    ):
        f = getattr(lib, fn)
        f.argtypes, f.restype = args, i32
    lib.em_read.argtypes, lib.em_read.restype = [ptr, i64, i32], ctypes.c_uint64
    lib.em_isa_name.argtypes, lib.em_isa_name.restype = [i32], ctypes.c_char_p
    return lib
