"""The peers' environment: a virtual environment under the benchmark's work directory
with llama.cpp's Python bindings (ik-llama-cpp-python: a prebuilt CPU wheel that also
ships llama.cpp's convert_hf_to_gguf.py and llama-quantize), the `gguf` package the
converter needs, sentencepiece (imported by the converter) and accelerate (for
transformers' disk offload). None of it is a dependency of edgemoe.

The environment sees the packages of the interpreter that created it (torch,
transformers, numpy) through a .pth file, so nothing large is installed twice; its own
packages come first on sys.path.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

PACKAGES = ["ik-llama-cpp-python", "gguf", "sentencepiece", "accelerate"]
PTH_NAME = "edgemoe-bench-parent.pth"


class PeerError(Exception):
    pass


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def setup(venv: Path, packages: list[str] = PACKAGES, log=print) -> Path:
    """Create (or update) the environment and install the peers. Returns its python."""
    venv = Path(venv)
    py = venv_python(venv)
    if not py.exists():
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    parent = sysconfig.get_paths()["purelib"]
    Path(purelib, PTH_NAME).write_text(parent + "\n")
    log(f"installing {' '.join(packages)} into {venv} (it sees {parent})")
    proc = subprocess.run([str(py), "-m", "pip", "install", "--quiet", *packages], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PeerError(f"pip could not install {' '.join(packages)} into {venv}:\n{proc.stderr.strip()[-2000:]}")
    return py


_LLAMA_PROBE = r"""
import json, pathlib, sysconfig, ik_llama_cpp
from ik_llama_cpp import _ctypes_api
import gguf
site = pathlib.Path(sysconfig.get_paths()["purelib"])
pkg = pathlib.Path(ik_llama_cpp.__file__).parent
conv = [str(p) for p in (site / "bin" / "convert_hf_to_gguf.py", pkg / "convert_hf_to_gguf.py") if p.exists()]
quant = [str(p) for p in (site / "bin" / "llama-quantize", pkg / "bin" / "llama-quantize") if p.exists()]
print(json.dumps({"version": ik_llama_cpp.__version__, "converter": conv[:1], "quantize": quant[:1],
                  "gguf": gguf.__version__ if hasattr(gguf, "__version__") else "?"}))
"""

_TRANSFORMERS_PROBE = r"""
import json, transformers, accelerate, torch
print(json.dumps({"transformers": transformers.__version__, "accelerate": accelerate.__version__,
                  "torch": torch.__version__}))
"""


def _probe(python: Path, code: str, what: str) -> dict:
    import json

    if not Path(python).exists():
        raise PeerError(f"{what}: no peers environment at {Path(python).parent.parent} "
                        "(set it up with 'edgemoe bench --setup', or give --peers-python)")
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise PeerError(f"{what} is not installed in {python}: {last} (run 'edgemoe bench --setup')")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_llama(python: Path) -> dict:
    """Versions and tool paths of the llama.cpp bindings; PeerError if unusable."""
    info = _probe(python, _LLAMA_PROBE, "llama.cpp (ik-llama-cpp-python)")
    if not info["converter"]:
        raise PeerError(f"ik-llama-cpp-python {info['version']} in {python} ships no convert_hf_to_gguf.py")
    if not info["quantize"]:
        raise PeerError(f"ik-llama-cpp-python {info['version']} in {python} ships no llama-quantize")
    info["converter"], info["quantize"] = info["converter"][0], info["quantize"][0]
    return info


def check_transformers(python: Path) -> dict:
    return _probe(python, _TRANSFORMERS_PROBE, "transformers + accelerate")
