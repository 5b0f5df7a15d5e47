"""Helpers shared by the expert-store and offloaded-runtime tests."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import edgemoe
from conftest import save_checkpoint, tiny_config
from edgemoe.runtime.trace import TraceRecorder
from edgemoe.store.convert import convert

# Token-id prompts: no tokenizer involved, and long enough that prefill routes each layer
# to every expert of the tiny models (more distinct experts than a minimal cache holds).
PROMPTS = [[0, 17, 93, 211, 5, 48, 150, 260, 31, 77, 12], [0, 300, 301, 4, 9, 120]]
NEW_TOKENS = 8


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """One intra-op thread for a package of tests that runs many tiny models: with two on a
    busy 2-core machine every op waits on a thread barrier, which made them ~8x slower.
    Restored afterwards. Its conftest imports it (tests/store, tests/runtime)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_checkpoint(out: Path, family: str = "mixtral", tokenizer_dir: Path | None = None, seed: int = 0,
                    dtype: torch.dtype = torch.float32, **overrides) -> Path:
    save_checkpoint(tiny_config(family, **overrides), out, tokenizer_dir, seed=seed, dtype=dtype)
    return out


def make_converted(src: Path, out: Path, **kwargs) -> Path:
    convert(src, out, **kwargs)
    return out


def run_prompts(engine, prompts=PROMPTS, n: int = NEW_TOKENS) -> list[list[int]]:
    """Greedy token ids for each prompt (fixed length: EOS ignored)."""
    return [engine.generate(p, max_tokens=n, ignore_eos=True).token_ids for p in prompts]


def reference(hf_dir: Path, trace_path: Path | None = None, dtype=None, prompts=PROMPTS, n: int = NEW_TOKENS):
    """Tokens of the in-RAM engine, optionally recording the routing trace of the run."""
    engine = edgemoe.load(hf_dir, dtype=dtype)
    recorder = TraceRecorder(engine.model) if trace_path is not None else None
    tokens = run_prompts(engine, prompts, n)
    if recorder is not None:
        recorder.save(trace_path)
    engine.close()
    return tokens


def min_budget(converted: Path) -> int:
    engine = edgemoe.load(converted, memory=None)
    try:
        return engine.info["min_budget_bytes"]
    finally:
        engine.close()


def offloaded_prompts(converted: Path) -> list[list[int]]:
    """run_prompts on the converted model offloaded under its smallest budget (LRU cache):
    what tests compare with the in-RAM tokens."""
    engine = edgemoe.load(converted, memory=min_budget(converted), cache_policy="lru")
    try:
        return run_prompts(engine)
    finally:
        engine.close()


def edit_manifest(path: Path, fn) -> Path:
    """Edit the manifest.json of the converted model at `path` with fn(data) and re-sign it
    as the converter does, so that only the edit itself can be refused."""
    from edgemoe.store.manifest import _checksum

    file = path / "manifest.json"
    data = json.loads(file.read_text())
    fn(data)
    data["checksum"] = _checksum(data)
    file.write_text(json.dumps(data))
    return file


def manifest(converted: Path) -> dict:
    return json.loads((converted / "manifest.json").read_text())


class Hang(BaseException):
    """Raised by `deadline`: a BaseException, so that no `except OSError` or `except
    Exception` in the code under test turns a hang into an ordinary error."""


@contextmanager
def deadline(seconds: int):
    """Fail (raise Hang) if the body runs longer than `seconds` (main thread only)."""
    def fire(*_):
        raise Hang(f"no result within {seconds} s (hang?)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
