"""Seeded fuzzing of a converted model's files: the clean-error contract.

A small model is converted once (with a fitted predictor.npz, so that file is fuzzed too).
Each case damages one thing (bytes flipped or overwritten, a file truncated, extended,
deleted or replaced, the manifest edited and re-signed with a valid checksum, the model
changed on disk while it runs) and then loads the model and generates a few tokens. The
case passes when

- it raises an EdgeMoEError subclass with a message (a clear error), or
- it generates exactly the tokens of the undamaged model (the damage was harmless: padding,
  JSON whitespace, a file the runtime does not need, an informational field), or
- for edits of hyper-parameters that describe another valid model (rope_theta, top-k, ...),
  it generates some tokens.

Any other exception, a hang (a deadline per case), or other tokens where the damage is
detectable (expert or resident bytes: every one is checksummed) fail. Most cases run in
this process; a sample runs through the command line (one `edgemoe: error:` line, no
traceback). Every case is named in a failure, with what it did.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

import edgemoe
from edgemoe.errors import EdgeMoEError
from edgemoe.runtime.fit import fit
from edgemoe.runtime.predict import PREDICTOR_FILE
from edgemoe.runtime.trace import RoutingTrace, TraceRecorder
from edgemoe.store import manifest as store_format
from edgemoe.store.manifest import read_manifest

from cli.helpers import assert_clean_error
from store.helpers import deadline, make_checkpoint, make_converted

SEED = 20261129
PROMPT = [0, 17, 93, 211, 5, 48, 150, 260, 31, 77, 12]
N = 4
DEADLINE_S = 30

SAME = "same"  # the undamaged model's tokens, or a clean error
MUST_FAIL = "error"  # a clean error: the damage is always detectable
ANY = "any"  # another valid model: any tokens, or a clean error


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass
class Case:
    name: str
    apply: Callable[[Path], None]
    expect: str = SAME
    runtime: dict = field(default_factory=dict)  # edgemoe.load options; the default: a small cache
    deadline: int = 10  # seconds before the case counts as a hang


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("fuzz")
    # intermediate_size 90: blobs are not a multiple of 4 KiB, so the store has padding.
    hf = make_checkpoint(d / "hf", "mixtral", tokenizer_dir, intermediate_size=90)
    conv = make_converted(hf, d / "conv")
    engine = edgemoe.load(conv)
    recorder = TraceRecorder(engine.model)
    for start in range(0, 300, 30):
        engine.generate(list(range(start, start + 30)), max_tokens=2, ignore_eos=True)
    recorder.save(d / "trace.npz")
    engine.close()
    fit([RoutingTrace.load(d / "trace.npz")]).save(conv / PREDICTOR_FILE)
    m = read_manifest(conv)
    with edgemoe.load(conv) as e:
        # Room for the minimum (one layer's top-2) and four more experts of twelve: re-reads
        # and evictions, and preloading stays on.
        small = e.info["min_budget_bytes"] + 4 * m.experts[0].length
    files = {p.name: p.read_bytes() for p in conv.iterdir()}
    work = d / "work"
    shutil.copytree(conv, work)
    b = SimpleNamespace(hf=hf, conv=conv, work=work, manifest=m, files=files, small=small, root=d)
    b.ref = {"io-exp": run_tokens(conv, runtime(b, {})), "io-free": run_tokens(conv, runtime(b, {"mode": "io-free"}))}
    with edgemoe.load(conv, memory=small, verify="always") as e:
        assert e.info.get("prefetch") and e.info.get("predictor") == "combined", e.info
    return b


def runtime(base, extra: dict) -> dict:
    opts = {"memory": base.small, "verify": "always"}
    if extra.get("mode") == "io-free":
        opts = {"verify": "always"}
    return {**opts, **extra}


def run_tokens(path: Path, opts: dict) -> list[int]:
    with edgemoe.load(path, **opts) as engine:
        return engine.generate(PROMPT, max_tokens=N, ignore_eos=True).token_ids




def restore(base) -> None:
    """Put the working copy back to the converted model, byte for byte."""
    for p in base.work.iterdir():
        if p.name not in base.files or p.is_symlink() or not p.is_file():  # links, directories, pipes
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for name, data in base.files.items():
        p = base.work / name
        if not p.exists() or p.stat().st_size != len(data) or p.read_bytes() != data:
            p.write_bytes(data)


def attempt(base, case: Case) -> tuple[str, object]:
    """("error", (phase, exception)) or ("tokens", ids)."""
    opts = runtime(base, case.runtime)
    with deadline(case.deadline):
        try:
            engine = edgemoe.load(base.work, **opts)
        except EdgeMoEError as e:
            return "error", ("load", e)
        try:
            return "tokens", engine.generate(PROMPT, max_tokens=N, ignore_eos=True).token_ids
        except EdgeMoEError as e:
            return "error", ("generate", e)
        finally:
            engine.close()


def check_cases(base, cases: list[Case]) -> dict:
    """Run every case; fail with the list of those that broke the contract."""
    bad, tally = [], {"error": 0, "same": 0, "other-model": 0}
    for case in cases:
        restore(base)
        try:
            case.apply(base.work)
            kind, value = attempt(base, case)
        except BaseException as e:  # noqa: BLE001 - any other exception breaks the contract
            if isinstance(e, KeyboardInterrupt):
                raise
            tb = traceback.format_exception(type(e), e, e.__traceback__)
            bad.append(f"{case.name}: {type(e).__name__}: {e}\n    " + "    ".join(tb[-3:]))
            continue
        finally:
            restore(base)
        ref = base.ref["io-free" if case.runtime.get("mode") == "io-free" else "io-exp"]
        if kind == "error":
            phase, e = value
            if not str(e).strip():
                bad.append(f"{case.name}: {type(e).__name__} without a message")
            tally["error"] += 1
        elif case.expect == MUST_FAIL:
            bad.append(f"{case.name}: undetected (tokens {value}, undamaged {ref})")
        elif value == ref:
            tally["same"] += 1
        elif case.expect == ANY:
            tally["other-model"] += 1
        else:
            bad.append(f"{case.name}: silently other tokens {value} (undamaged: {ref})")
    assert not bad, f"{len(bad)} of {len(cases)} cases broke the contract:\n" + "\n".join(bad)
    return tally


# ----------------------------------------------------------------------------- mutations


def overwrite(name: str, offset: int, data: bytes):
    def apply(d: Path) -> None:
        with open(d / name, "r+b") as f:
            f.seek(offset)
            f.write(data)

    return apply


def truncate(name: str, size: int):
    return lambda d: os.truncate(d / name, size)


def extend(name: str, data: bytes):
    def apply(d: Path) -> None:
        with open(d / name, "ab") as f:
            f.write(data)

    return apply


def resign(edit):
    """Edit the parsed manifest and write it back with a valid checksum (as a buggy tool would)."""
    def apply(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        edit(m)
        m["checksum"] = store_format._checksum(m)
        (d / "manifest.json").write_text(json.dumps(m))

    return apply


def flip_byte(rng: random.Random, data: bytes, offset: int) -> bytes:
    return bytes([data[offset] ^ rng.randrange(1, 256)])


def resident_data_start(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def byte_cases(base, rng: random.Random) -> list[Case]:
    m, files = base.manifest, base.files
    store = files["experts.bin"]
    cases = []
    # Expert payload bytes: every one is checksummed, and io-free reads every expert.
    for i in range(30):
        e = rng.choice(m.experts)
        off = e.offset + rng.randrange(e.size)
        cases.append(Case(f"experts.bin payload of {e.name} @{off}", overwrite("experts.bin", off, flip_byte(rng, store, off)),
                          MUST_FAIL, {"mode": "io-free"}))
    # Anywhere in the store (header, payload, padding), small cache, checked on every read.
    for i in range(25):
        off = rng.randrange(len(store))
        cases.append(Case(f"experts.bin @{off}", overwrite("experts.bin", off, flip_byte(rng, store, off))))
    res = files["resident.safetensors"]
    start = resident_data_start(res)
    for i in range(15):  # tensor data: every tensor is checksummed at load
        off = rng.randrange(start, len(res))
        cases.append(Case(f"resident.safetensors data @{off}", overwrite("resident.safetensors", off,
                                                                         flip_byte(rng, res, off)), MUST_FAIL))
    for i in range(15):  # header: its length, its JSON
        off = rng.randrange(start)
        cases.append(Case(f"resident.safetensors header @{off}", overwrite("resident.safetensors", off,
                                                                           flip_byte(rng, res, off))))
    for name, n in (("manifest.json", 20), (PREDICTOR_FILE, 15), ("config.json", 4), ("tokenizer.json", 3)):
        data = files[name]
        for i in range(n):
            off = rng.randrange(len(data))
            cases.append(Case(f"{name} @{off}", overwrite(name, off, flip_byte(rng, data, off))))
    for i in range(12):  # bursts of random bytes
        name = rng.choice(["experts.bin", "resident.safetensors", "manifest.json", PREDICTOR_FILE])
        data = files[name]
        n = rng.randrange(2, 64)
        off = rng.randrange(max(1, len(data) - n))
        expect = MUST_FAIL if name == "resident.safetensors" and off >= resident_data_start(data) else SAME
        cases.append(Case(f"{name} {n} random bytes @{off}", overwrite(name, off, rng.randbytes(n)), expect))
    return cases


def size_cases(base, rng: random.Random) -> list[Case]:
    files = base.files
    cases = []
    for name in ("experts.bin", "resident.safetensors", "manifest.json", PREDICTOR_FILE, "config.json",
                 "tokenizer.json", "tokenizer_config.json"):
        size = len(files[name])
        strict = name in ("experts.bin", "resident.safetensors")  # sizes are in the manifest
        for cut in sorted({0, 1, size // 2, size - 1, rng.randrange(size)}):
            cases.append(Case(f"{name} truncated to {cut}", truncate(name, cut), MUST_FAIL if strict else SAME))
        for n in (1, 4096, rng.randrange(1, 10000)):
            cases.append(Case(f"{name} + {n} random bytes", extend(name, rng.randbytes(n)), MUST_FAIL if strict else SAME))
        cases.append(Case(f"{name} + 4096 zero bytes", extend(name, bytes(4096)), MUST_FAIL if strict else SAME))
    return cases


def file_cases(base, rng: random.Random) -> list[Case]:
    cases = []
    names = sorted(base.files)
    for name in names:
        cases.append(Case(f"{name} deleted", lambda d, n=name: (d / n).unlink(),
                          MUST_FAIL if name in ("experts.bin", "resident.safetensors", "manifest.json") else SAME))

    def to_dir(name):
        def apply(d):
            (d / name).unlink()
            (d / name).mkdir()
        return apply

    def to_link(name, target):
        def apply(d):
            (d / name).unlink()
            (d / name).symlink_to(target)
        return apply

    def to_fifo(name):
        def apply(d):
            (d / name).unlink()
            os.mkfifo(d / name)  # opening it for reading would wait for a writer forever
        return apply

    for name in ("experts.bin", "resident.safetensors", "manifest.json", PREDICTOR_FILE, "tokenizer.json"):
        cases.append(Case(f"{name} is a directory", to_dir(name)))
        cases.append(Case(f"{name} links to /dev/null", to_link(name, "/dev/null")))
    # Not tokenizer.json: the tokenizers library opens it in native code, where no
    # deadline can stop the wait.
    for name in ("experts.bin", "resident.safetensors", "manifest.json", PREDICTOR_FILE):
        cases.append(Case(f"{name} is a named pipe", to_fifo(name), deadline=2))
    for name in ("experts.bin", "resident.safetensors"):  # files whose size is checked before reading
        cases.append(Case(f"{name} links to /dev/zero", to_link(name, "/dev/zero")))
    for a, b in (("experts.bin", "resident.safetensors"), ("resident.safetensors", "experts.bin"),
                 ("manifest.json", "config.json"), (PREDICTOR_FILE, "experts.bin")):
        cases.append(Case(f"{a} replaced by {b}", lambda d, a=a, b=b: shutil.copyfile(d / b, d / a)))
    return cases


def entry(m: dict, i: int) -> dict:
    return m["experts"][i % len(m["experts"])]


def manifest_cases(base, rng: random.Random) -> list[Case]:
    """Edits of the store description, re-signed so that only the consistency checks
    and the checksums of the data can catch them."""
    n = len(base.manifest.experts)
    fmt = next(iter(base.manifest.formats))
    weird = [None, True, "1", 1.5, -1, -4096, 2**63, 2**64 + 7, [], {}, "", 0]
    edits = []
    for key in ("offset", "size", "crc32", "layer", "expert", "format"):
        for v in rng.sample(weird, 5):
            i = rng.randrange(n)
            edits.append((f"experts[{i}].{key} = {v!r}", lambda m, i=i, k=key, v=v: entry(m, i).update({k: v})))
    for i in rng.sample(range(n), 4):
        edits += [
            (f"experts[{i}].offset + 4096", lambda m, i=i: entry(m, i).update(offset=entry(m, i)["offset"] + 4096)),
            (f"experts[{i}].offset - 4096", lambda m, i=i: entry(m, i).update(offset=entry(m, i)["offset"] - 4096)),
            (f"experts[{i}].size - 1", lambda m, i=i: entry(m, i).update(size=entry(m, i)["size"] - 1)),
            (f"experts[{i}].crc32 + 1", lambda m, i=i: entry(m, i).update(crc32=(entry(m, i)["crc32"] + 1) % 2**32)),
            (f"experts[{i}].layer + 1", lambda m, i=i: entry(m, i).update(layer=entry(m, i)["layer"] + 1)),
            (f"experts[{i}].expert + 1", lambda m, i=i: entry(m, i).update(expert=entry(m, i)["expert"] + 1)),
            (f"experts[{i}] removed", lambda m, i=i: m["experts"].pop(i)),
            (f"experts[{i}] duplicated", lambda m, i=i: m["experts"].append(dict(entry(m, i)))),
        ]

    def swap(m, a, b, keys):
        for k in keys:
            entry(m, a)[k], entry(m, b)[k] = entry(m, b)[k], entry(m, a)[k]

    swaps = []
    for a, b in (rng.sample(range(n), 2) for _ in range(4)):
        edits.append((f"experts[{a}] and [{b}] swap offsets", lambda m, a=a, b=b: swap(m, a, b, ["offset"])))
        swaps.append((f"experts[{a}] and [{b}] swap layer and expert",
                      lambda m, a=a, b=b: swap(m, a, b, ["layer", "expert"])))
    edits.append(("experts reversed", lambda m: m["experts"].reverse()))  # harmless: order is not meaning
    edits.append(("experts = []", lambda m: m.update(experts=[])))
    edits.append(("experts = {}", lambda m: m.update(experts={})))
    # Formats and their blob layout.
    f = lambda m: m["formats"][fmt]  # noqa: E731
    part = lambda m, j=0: f(m)["parts"][j]  # noqa: E731
    edits += [
        ("format renamed", lambda m: (m["formats"].update({"fp16": m["formats"].pop(fmt)}),
                                      [e.update(format="fp16") for e in m["experts"]])),
        ("format renamed to an unknown one", lambda m: (m["formats"].update({"fp9": m["formats"].pop(fmt)}),
                                                        [e.update(format="fp9") for e in m["experts"]])),
        ("format bytes + 64", lambda m: f(m).update(bytes=f(m)["bytes"] + 64)),
        ("format bits = 3", lambda m: f(m).update(bits=3.0)),
        ("format bits = 'x'", lambda m: f(m).update(bits="x")),
        ("format tag = 'avx512'", lambda m: f(m).update(tag="avx512")),
        ("format parts = []", lambda m: f(m).update(parts=[])),
        ("format parts reversed", lambda m: f(m)["parts"].reverse()),
        ("format part dropped", lambda m: f(m)["parts"].pop()),
        ("format part duplicated", lambda m: f(m)["parts"].append(dict(part(m)))),
        ("format part renamed", lambda m: part(m).update(name="w9")),
        ("format part dtype float16", lambda m: part(m).update(dtype="float16")),
        ("format part dtype int8", lambda m: part(m).update(dtype="int8")),
        ("format part dtype unknown", lambda m: part(m).update(dtype="float7")),
        ("format part dtype null", lambda m: part(m).update(dtype=None)),
        ("format part shape transposed", lambda m: part(m).update(shape=part(m)["shape"][::-1])),
        ("format part shape 3-d", lambda m: part(m).update(shape=[1, *part(m)["shape"]])),
        ("format part shape negative", lambda m: part(m).update(shape=[-1, part(m)["shape"][1]])),
        ("format part shape huge", lambda m: part(m).update(shape=[2**40, 2**40])),
        ("format part shape string", lambda m: part(m).update(shape="64x96")),
        ("format part offset + 64", lambda m: part(m, 1).update(offset=part(m, 1)["offset"] + 64)),
        ("format part offset odd", lambda m: part(m, 1).update(offset=part(m, 1)["offset"] + 1)),
        ("format part offset negative", lambda m: part(m, 1).update(offset=-64)),
        ("formats = []", lambda m: m.update(formats=[])),
    ]
    # Resident weights and the store file.
    t0 = sorted(base.manifest.resident_tensors)[0]
    edits += [
        ("resident bytes + 1", lambda m: m["resident"].update(bytes=m["resident"]["bytes"] + 1)),
        ("resident bytes = -1", lambda m: m["resident"].update(bytes=-1)),
        ("resident file = experts.bin", lambda m: m["resident"].update(file="experts.bin")),
        ("resident file = ../hf/model.safetensors", lambda m: m["resident"].update(file="../hf/model.safetensors")),
        ("resident file = ''", lambda m: m["resident"].update(file="")),
        ("resident file = 7", lambda m: m["resident"].update(file=7)),
        ("resident tensor crc + 1", lambda m: m["resident"]["tensors"][t0].update(
            crc32=(m["resident"]["tensors"][t0]["crc32"] + 1) % 2**32)),
        ("resident tensor crc = 'x'", lambda m: m["resident"]["tensors"][t0].update(crc32="x")),
        ("resident tensor crc entry = 5", lambda m: m["resident"]["tensors"].update({t0: 5})),
        ("resident tensor renamed", lambda m: m["resident"]["tensors"].update({"x.weight": m["resident"]["tensors"].pop(t0)})),
        ("resident tensors = []", lambda m: m["resident"].update(tensors=[])),
        ("resident int8 listed (version 1: ignored)", lambda m: m["resident"].update(int8=["layers.0.attn.q"])),
        ("version 2 with an int8 layer that is float", lambda m: (m.update(version=2),
                                                                   m["resident"].update(int8=["layers.0.attn.q"]))),
        ("version 2 with int8 = 'x'", lambda m: (m.update(version=2), m["resident"].update(int8="x"))),
        ("version 2 with int8 = [1]", lambda m: (m.update(version=2), m["resident"].update(int8=[1]))),
        ("version 2 without int8", lambda m: m.update(version=2)),
        ("store bytes - 4096", lambda m: m["store"].update(bytes=m["store"]["bytes"] - 4096)),
        ("store bytes = '1'", lambda m: m["store"].update(bytes="1")),
        ("store file = resident.safetensors", lambda m: m["store"].update(file="resident.safetensors")),
        ("store file = /etc/passwd", lambda m: m["store"].update(file="/etc/passwd")),
        ("store file = None", lambda m: m["store"].update(file=None)),
        ("store header_bytes = 512", lambda m: m["store"].update(header_bytes=512)),
        ("store = []", lambda m: m.update(store=[])),
        ("resident removed", lambda m: m.pop("resident")),
    ]
    # Top-level fields.
    edits += [
        ("store_id changed", lambda m: m.update(store_id="0" * 32)),
        ("store_id = 5", lambda m: m.update(store_id=5)),
        ("model_type = qwen3_moe", lambda m: (m.update(model_type="qwen3_moe"), m["config"].update(model_type="qwen3_moe"))),
        ("model_type = llama", lambda m: (m.update(model_type="llama"), m["config"].update(model_type="llama"))),
        ("model_type = 5", lambda m: (m.update(model_type=5), m["config"].update(model_type=5))),
        ("dtype = float16", lambda m: m.update(dtype="float16")),
        ("dtype = int8", lambda m: m.update(dtype="int8")),
        ("dtype = float7", lambda m: m.update(dtype="float7")),
        ("dtype = None", lambda m: m.update(dtype=None)),
        ("alignment = 512", lambda m: m.update(alignment=512)),
        ("version = 0", lambda m: m.update(version=0)),
        ("version = '1'", lambda m: m.update(version="1")),
        ("version = 1.0", lambda m: m.update(version=1.0)),
        ("created_by changed", lambda m: m.update(created_by="someone else")),
        ("unknown key added", lambda m: m.update(extra={"a": 1})),
        ("config = []", lambda m: m.update(config=[])),
        ("manifest = []", lambda m: m.clear()),
    ]
    cases = [Case(f"manifest {name}", resign(fn)) for name, fn in edits]
    # Two entries trading their (layer, expert) labels describe a consistent store of
    # another model: the checksums cover the blob, not which expert it is. Not detectable
    # with this manifest format, so other tokens are allowed here.
    cases += [Case(f"manifest {name}", resign(fn), ANY) for name, fn in swaps]
    # dtype float16 describes other resident and compute dtype than the weights: tokens may differ.
    for c in cases:
        if c.name == "manifest dtype = float16":
            c.expect = ANY
    return cases


def config_cases(base, rng: random.Random) -> list[Case]:
    """Re-signed edits of the config inside the manifest: shapes and counts that no longer
    match the weights must be refused; hyper-parameters that describe another valid
    model may change the tokens."""
    shape_keys = ["hidden_size", "intermediate_size", "num_local_experts", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "head_dim", "num_experts_per_tok"]
    weird = [0, -1, None, "64", 64.5, True, [], 2**62, 1e300]
    edits = []
    for key in shape_keys:
        for v in rng.sample(weird, 4):
            edits.append((f"{key} = {v!r}", SAME, lambda m, k=key, v=v: m["config"].update({k: v})))
        edits.append((f"{key} removed", SAME, lambda m, k=key: m["config"].pop(k, None)))
    edits += [
        ("hidden_size = 32", SAME, lambda m: m["config"].update(hidden_size=32)),
        ("hidden_size = 128", SAME, lambda m: m["config"].update(hidden_size=128)),
        ("intermediate_size = 96", SAME, lambda m: m["config"].update(intermediate_size=96)),
        ("num_local_experts = 3", SAME, lambda m: m["config"].update(num_local_experts=3)),
        ("num_local_experts = 5", SAME, lambda m: m["config"].update(num_local_experts=5)),
        ("num_hidden_layers = 2", SAME, lambda m: m["config"].update(num_hidden_layers=2)),
        ("num_hidden_layers = 4", SAME, lambda m: m["config"].update(num_hidden_layers=4)),
        ("num_attention_heads = 8", SAME, lambda m: m["config"].update(num_attention_heads=8)),
        ("num_attention_heads = 3", SAME, lambda m: m["config"].update(num_attention_heads=3)),
        ("num_key_value_heads = 4", SAME, lambda m: m["config"].update(num_key_value_heads=4)),
        ("num_key_value_heads = 3", SAME, lambda m: m["config"].update(num_key_value_heads=3)),
        ("vocab_size = 100", SAME, lambda m: m["config"].update(vocab_size=100)),
        ("vocab_size = 1000", SAME, lambda m: m["config"].update(vocab_size=1000)),
        ("head_dim = 8", SAME, lambda m: m["config"].update(head_dim=8)),
        ("head_dim = 15", SAME, lambda m: m["config"].update(head_dim=15)),
        ("num_experts_per_tok = 5", SAME, lambda m: m["config"].update(num_experts_per_tok=5)),
        ("num_experts_per_tok = 1", ANY, lambda m: m["config"].update(num_experts_per_tok=1)),
        ("num_experts_per_tok = 4", ANY, lambda m: m["config"].update(num_experts_per_tok=4)),
        ("rms_norm_eps = 0.5", ANY, lambda m: m["config"].update(rms_norm_eps=0.5)),
        ("rms_norm_eps = -1", ANY, lambda m: m["config"].update(rms_norm_eps=-1.0)),
        ("rms_norm_eps = 'x'", SAME, lambda m: m["config"].update(rms_norm_eps="x")),
        ("rope_theta = 10", ANY, lambda m: m["config"].update(rope_theta=10.0)),
        ("rope_theta = 0", ANY, lambda m: m["config"].update(rope_theta=0)),
        ("rope_theta = 'x'", SAME, lambda m: m["config"].update(rope_theta="x")),
        ("rope_scaling = {'type': 'nonsense'}", ANY, lambda m: m["config"].update(rope_scaling={"type": "nonsense"})),
        ("rope_scaling = 5", ANY, lambda m: m["config"].update(rope_scaling=5)),
        ("hidden_act = gelu", ANY, lambda m: m["config"].update(hidden_act="gelu")),
        ("hidden_act = nonsense", SAME, lambda m: m["config"].update(hidden_act="nonsense")),
        ("hidden_act = 3", SAME, lambda m: m["config"].update(hidden_act=3)),
        ("max_position_embeddings = 4", ANY, lambda m: m["config"].update(max_position_embeddings=4)),
        ("max_position_embeddings = 0", ANY, lambda m: m["config"].update(max_position_embeddings=0)),
        ("tie_word_embeddings = true", ANY, lambda m: m["config"].update(tie_word_embeddings=True)),
        ("tie_word_embeddings = 'yes'", ANY, lambda m: m["config"].update(tie_word_embeddings="yes")),
        ("sliding_window = 2", ANY, lambda m: m["config"].update(sliding_window=2)),
        ("sliding_window = -3", ANY, lambda m: m["config"].update(sliding_window=-3)),
        ("eos_token_id = [1, 2]", ANY, lambda m: m["config"].update(eos_token_id=[1, 2])),
        ("eos_token_id = 'x'", ANY, lambda m: m["config"].update(eos_token_id="x")),
        ("bos_token_id = 10000", ANY, lambda m: m["config"].update(bos_token_id=10000)),
        ("router_jitter_noise = 0.5", ANY, lambda m: m["config"].update(router_jitter_noise=0.5)),
        ("torch_dtype = float16", ANY, lambda m: m["config"].update(torch_dtype="float16")),
        ("config model_type = llama", SAME, lambda m: m["config"].update(model_type="llama")),
    ]
    return [Case(f"manifest config {name}", resign(fn), expect) for name, expect, fn in edits]


def all_cases(base) -> dict[str, list[Case]]:
    rng = random.Random(SEED)
    return {"bytes": byte_cases(base, rng), "sizes": size_cases(base, rng), "files": file_cases(base, rng),
            "manifest": manifest_cases(base, rng), "config": config_cases(base, rng)}


@pytest.fixture(scope="module")
def cases(base):
    return all_cases(base)


def test_enough_cases(cases):
    assert sum(len(v) for v in cases.values()) >= 200


@pytest.mark.parametrize("group", ["bytes", "sizes", "files", "manifest", "config"])
def test_clean_error_contract(base, cases, group):
    tally = check_cases(base, cases[group])
    if group == "bytes":  # most damage is caught; padding and JSON whitespace are not damage
        assert tally["error"] > 100 and tally["same"] > 5, tally


def test_experts_overwritten_while_running(base):
    """An expert's bytes change on disk after its first (checked) read: with verify
    "always" the next read from storage is checked again, so the engine raises or gives
    the tokens computed from the bytes it checked; never others."""
    rng = random.Random(SEED + 1)
    m = base.manifest
    bad, caught = [], 0
    for trial in range(12):
        restore(base)
        with deadline(DEADLINE_S), edgemoe.load(base.work, memory=base.small, verify="always") as engine:
            assert engine.generate(PROMPT, max_tokens=N, ignore_eos=True).token_ids == base.ref["io-exp"]
            victims = rng.sample(m.experts, 3)
            with open(base.work / "experts.bin", "r+b") as f:
                for e in victims:
                    f.seek(e.offset + rng.randrange(e.size))
                    f.write(rng.randbytes(8))
            try:
                got = engine.generate(PROMPT, max_tokens=N, ignore_eos=True).token_ids
            except EdgeMoEError as e:
                assert "checksum mismatch" in str(e), str(e)
                caught += 1
                continue
            if got != base.ref["io-exp"]:
                bad.append(f"trial {trial}: {[v.name for v in victims]} overwritten: tokens {got}")
    restore(base)
    assert not bad, bad
    assert caught >= 6, caught  # most trials re-read a damaged expert (the cache holds half of them)


def test_cli_sample(base, cases, tmp_path):
    """Eight damaged models that fail to load, through `edgemoe generate`: exit status
    non-zero, exactly one `edgemoe: error:` line (the message the API raised), no traceback."""
    rng = random.Random(SEED + 2)
    pool = [c for group in cases.values() for c in group]
    rng.shuffle(pool)
    picked = []
    for case in pool:  # those that fail at load in this process fail the same way from the CLI
        restore(base)
        case.apply(base.work)
        kind, value = attempt(base, case)
        restore(base)
        if kind == "error" and value[0] == "load":
            picked.append((case, str(value[1])))
            if len(picked) == 8:
                break
    assert len(picked) == 8
    procs = []
    for i, (case, message) in enumerate(picked):
        name = case.name
        d = tmp_path / f"m{i}"
        shutil.copytree(base.conv, d)
        case.apply(d)
        opts = runtime(base, case.runtime)
        argv = ["generate", str(d), "-p", "def add(a, b):", "-n", "3", "--verify", "always"]
        if "memory" in opts:
            argv += ["--memory", str(opts["memory"])]
        if opts.get("mode"):
            argv += ["--mode", opts["mode"]]
        message = message.replace(str(base.work), str(d))
        procs.append((name, message, subprocess.Popen([sys.executable, "-m", "edgemoe", *argv], stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True)))
    for name, message, p in procs:
        out, err = p.communicate(timeout=120)
        proc = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        try:
            assert_clean_error(proc, message)  # the same error as in this process
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None

