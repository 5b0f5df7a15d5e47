"""Seeded fuzz of GGUF files: truncations, flipped bytes, huge counts and lengths, changed
value types, all in the header (metadata and tensor infos) where a parser can go wrong,
and a few in the tensor data.

The contract for every case: opening the file and reading every tensor either works or
raises a ModelLoadError whose one-line message names the file, within a few seconds (a
corrupt count must not make the reader loop over the whole address space). Any other
exception fails the case. Truncated files must fail. A sample also runs through
`edgemoe convert`, which must exit 0 or print exactly one `edgemoe: error:` line.

Reproduce one case with `pytest tests/fuzz/test_gguf_fuzz.py -k <case id>`.
"""

from __future__ import annotations

import random
import signal
import struct

import pytest
import torch
from cli.helpers import assert_clean_error, run_cli
from conftest import save_checkpoint, tiny_config

from edgemoe.errors import ModelLoadError
from edgemoe.store.gguf import GGUFCheckpoint
from store.gguf_helpers import write_gguf

SEED = 20261129
N_CASES = 48
CLI_SAMPLE = (3, 17)  # case numbers also run through the CLI (a subprocess each)
TIME_LIMIT_S = 10


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir) -> tuple[bytes, int]:
    """A tiny OLMoE GGUF with tokenizer, and where its tensor data starts."""
    import gguf

    d = tmp_path_factory.mktemp("gguf-fuzz")
    hf = save_checkpoint(tiny_config("olmoe", num_hidden_layers=1), d / "hf", tokenizer_dir, dtype=torch.float16)
    (path,), _ = write_gguf(hf.float(), tokenizer_dir, d / "base.gguf", "Q8_0")
    return path.read_bytes(), gguf.GGUFReader(path).data_offset


def mutate(data: bytes, header_end: int, rng: random.Random) -> tuple[str, bytes, bool]:
    """(description, mutated bytes, certainly invalid)."""
    kind = rng.choice(["truncate-header", "truncate-data", "flip", "flip", "huge-u64", "huge-u64", "type"])
    b = bytearray(data)
    if kind == "truncate-header":
        n = rng.randrange(0, header_end)
        return f"truncate at {n}", bytes(b[:n]), True
    if kind == "truncate-data":
        n = rng.randrange(header_end, len(b) - 1)
        return f"truncate at {n}", bytes(b[:n]), True
    if kind == "flip":
        where = [rng.randrange(4, header_end) for _ in range(rng.randint(1, 6))]
        for i in where:
            b[i] ^= 1 << rng.randrange(8)
        return f"flip bytes {where}", bytes(b), False
    if kind == "huge-u64":
        i = rng.randrange(8, header_end - 8)
        value = rng.choice([1 << 63, (1 << 64) - 1, 1 << 40, 1 << 32])
        struct.pack_into("<Q", b, i, value)
        return f"u64 {value} at {i}", bytes(b), False
    i = rng.randrange(8, header_end - 4)  # a plausible (small) type code somewhere in the header
    struct.pack_into("<I", b, i, rng.randrange(0, 16))
    return f"u32 type-like value at {i}", bytes(b), False


CASES = [(f"case{i:02d}", i) for i in range(N_CASES)]


@pytest.mark.parametrize("name,i", CASES, ids=[c[0] for c in CASES])
def test_fuzzed_gguf(base, tmp_path, name, i):
    data, header_end = base
    rng = random.Random(f"{SEED}-{i}")
    what, mutated, invalid = mutate(data, header_end, rng)
    path = tmp_path / "model.gguf"
    path.write_bytes(mutated)

    def too_slow(*_):
        raise TimeoutError(f"{what}: took more than {TIME_LIMIT_S} s")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(TIME_LIMIT_S)
    try:
        ckpt = GGUFCheckpoint(path)
        for _ in ckpt.tensors():
            pass
        ok = True
    except ModelLoadError as e:
        msg = str(e)
        assert msg.startswith(str(path)) and "\n" not in msg, (what, msg)
        ok = False
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not (invalid and ok), f"{what}: accepted"
    if i in CLI_SAMPLE:
        proc = run_cli("convert", path, tmp_path / "out")
        if proc.returncode:
            assert_clean_error(proc, str(path))
        else:
            assert ok, what
