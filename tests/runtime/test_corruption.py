"""Damaged converted models give a clear StoreError naming the file (and the layer and
expert), never wrong tokens, a crash or a hang; I/O errors inside a reader reach the caller."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import edgemoe
from edgemoe.errors import StoreError
from edgemoe.store import manifest as store_format
from edgemoe.store.manifest import HEADER_BYTES, read_manifest

from cli.helpers import assert_clean_error, run_cli
from store.helpers import deadline, make_checkpoint, make_converted, reference

PROMPT = [0, 17, 93, 211, 5, 48, 150, 260, 31, 77, 12]
N = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("corrupt")
    # intermediate_size 90: blobs are not a multiple of 4 KiB, so the store has padding.
    hf = make_checkpoint(d / "hf", "mixtral", tokenizer_dir, intermediate_size=90)
    conv = make_converted(hf, d / "conv")
    ref = reference(hf, prompts=[PROMPT], n=N)[0]
    engine = edgemoe.load(hf)
    used = []  # experts the prompt's prefill asks for, in order
    for block in engine.model.moe_blocks():
        block.hook = lambda layer, ids, w, logits: used.extend((layer, e) for e in sorted(set(ids.flatten().tolist())))
    engine.generate(PROMPT, max_tokens=1)
    engine.close()
    return SimpleNamespace(hf=hf, conv=conv, ref=ref, used=used, manifest=read_manifest(conv))


@pytest.fixture
def copy(model, tmp_path) -> Path:
    """A private copy of the converted model to damage."""
    out = tmp_path / "m"
    shutil.copytree(model.conv, out)
    return out


def tokens(path: Path, **kw) -> list[int]:
    engine = edgemoe.load(path, **kw)
    try:
        return engine.generate(PROMPT, max_tokens=N, ignore_eos=True).token_ids
    finally:
        engine.close()


def flip(path: Path, offset: int, value: int | None = None) -> int:
    """Replace one byte (by default with its bitwise complement); returns the old value."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ 0xFF if value is None else value]))
    return old


def rewrite_manifest(path: Path, edit) -> None:
    """Edit the manifest and store it with a valid checksum, as a buggy tool would."""
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    m["checksum"] = store_format._checksum(m)
    (path / "manifest.json").write_text(json.dumps(m))


# ----------------------------------------------------------------------------- expert blobs


def test_flipped_byte_in_expert_is_caught_before_use(model, copy):
    layer, expert = model.used[0]
    entry = model.manifest.table()[(layer, expert)]
    flip(copy / "experts.bin", entry.offset + entry.size // 2)
    engine = edgemoe.load(copy, memory=None)
    computed = []
    store = engine.provider.cache._store
    real_expert = store.expert
    store.expert = lambda e, *a: computed.append(e.key) or real_expert(e, *a)
    with pytest.raises(StoreError, match=rf"layer {layer} expert {expert}: checksum mismatch"):
        engine.generate(PROMPT, max_tokens=N)
    assert (layer, expert) not in computed  # no Expert was ever built from the bad bytes
    assert (layer, expert) not in engine.provider.cache  # and it did not stay in the cache
    engine.close()


def test_flipped_byte_caught_at_load_in_io_free(model, copy):
    entry = model.manifest.experts[-1]
    flip(copy / "experts.bin", entry.offset)
    with pytest.raises(StoreError, match=f"layer {entry.layer} expert {entry.expert}: checksum mismatch"):
        edgemoe.load(copy, mode="io-free")


def test_verify_always_catches_corruption_after_first_load(model, copy):
    """verify='first' checks each expert once; 'always' checks every read."""
    engine = edgemoe.load(copy, memory=edgemoe.load(copy).info["min_budget_bytes"], verify="always")
    engine.generate(PROMPT, max_tokens=1)  # every used expert verified once, most evicted again
    layer, expert = model.used[0]
    entry = model.manifest.table()[(layer, expert)]
    assert (layer, expert) not in engine.provider.cache
    flip(copy / "experts.bin", entry.offset + 1)
    with pytest.raises(StoreError, match=f"layer {layer} expert {expert}"):
        engine.generate(PROMPT, max_tokens=1)
    engine.close()


def test_verify_first_checks_each_expert_once_always_every_read(model, copy):
    """What the two settings check, in numbers: "first" the first read of each expert
    (not its re-reads after an eviction), "always" every read from storage."""
    budget = edgemoe.load(copy).info["min_budget_bytes"]
    counts = {}
    for verify in ("first", "always"):
        with edgemoe.load(copy, memory=budget, verify=verify) as engine:
            store = engine.provider.cache._store
            read, real = [], store.read_into
            store.read_into = lambda entry, *a, **k: read.append(entry.key) or real(entry, *a, **k)
            engine.generate(PROMPT, max_tokens=N, ignore_eos=True)
            c = engine.provider.cache.stats()
            counts[verify] = (c["verifications"], c["verify_bytes"], len(read), len(set(read)))
    size = model.manifest.experts[0].size
    checks, nbytes, reads, distinct = counts["first"]
    assert reads > distinct and checks == distinct and nbytes == distinct * size  # re-reads go unchecked
    checks, nbytes, reads, distinct = counts["always"]
    assert reads > distinct and checks == reads and nbytes == reads * size


def test_padding_bytes_are_not_payload(model, copy):
    """Padding (here: the end of the store header) is not payload: damaging it changes nothing."""
    flip(copy / "experts.bin", HEADER_BYTES - 1)
    assert tokens(copy) == model.ref


def test_truncated_store(model, copy):
    size = (copy / "experts.bin").stat().st_size
    last = max(model.manifest.experts, key=lambda e: e.offset)
    os.truncate(copy / "experts.bin", size - 5000)
    with pytest.raises(StoreError, match=rf"truncated.*layer {last.layer} expert {last.expert}"):
        edgemoe.load(copy)


def test_store_truncated_while_running(model, copy):
    """The file shrinks after it was opened: the short read names the expert."""
    engine = edgemoe.load(copy)
    os.truncate(copy / "experts.bin", HEADER_BYTES)
    layer, expert = model.used[0]
    with pytest.raises(StoreError, match=f"layer {layer} expert {expert}: read 0 of"):
        engine.generate(PROMPT, max_tokens=1)
    engine.close()


@pytest.mark.parametrize("name,needle", [("experts.bin", "expert store file is missing"),
                                         ("resident.safetensors", "resident weights file is missing"),
                                         ("manifest.json", "manifest.json: missing")])
def test_missing_file(copy, name, needle):
    (copy / name).unlink()
    with pytest.raises(StoreError, match=needle):
        edgemoe.load(copy)


def test_store_from_another_conversion(model, copy, tmp_path, tokenizer_dir):
    """Same shapes, same size, different conversion: refused before any expert is read."""
    other = make_converted(model.hf, tmp_path / "other")
    shutil.copyfile(other / "experts.bin", copy / "experts.bin")
    with pytest.raises(StoreError, match="different conversion"):
        edgemoe.load(copy)


# ----------------------------------------------------------------------------- manifest


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda m: m.update(version=99), "newer than this edgemoe supports"),
        (lambda m: m.update(format="something-else"), "not an edgemoe manifest"),
        (lambda m: m["experts"][3].update(size=m["experts"][3]["size"] + 4), "layer 0 expert 3: size"),
        (lambda m: m["experts"][5].update(offset=m["experts"][5]["offset"] + 512), "layer 1 expert 1: offset"),
        (lambda m: m["experts"][2].update(offset=m["experts"][1]["offset"]), "overlap"),
        (lambda m: m["experts"][7].update(format="bf16"), "layer 1 expert 3: format 'bf16' is not described"),
        (lambda m: m["experts"].pop(4), "layer 1 expert 0 is not in the manifest"),
        (lambda m: m["experts"].append(dict(m["experts"][0])), "listed twice"),
        (lambda m: m["formats"]["fp32"]["parts"][0].update(shape=[1, 1]), "blob layout in the manifest does not match"),
        (lambda m: m["formats"]["fp32"].update(tag="avx2"), "layout tag"),
        (lambda m: m["store"].update(bytes=m["store"]["bytes"] + 4096), "truncated: .* the manifest says"),
        (lambda m: m["resident"]["tensors"].pop("embed.weight"), "do not match the manifest"),
        (lambda m: m["config"].update(hidden_size=32), "blob layout in the manifest does not match experts of hidden size 32"),
        (lambda m: m["config"].update(num_local_experts=3), "layer 0 expert 3 is in the manifest but not in the model"),
        (lambda m: m["store"].update(file="../x"), "invalid file name"),
    ],
    ids=["version", "format", "size", "offset", "overlap", "expert-format", "missing-expert", "duplicate",
         "layout", "tag", "store-size", "resident-names", "config-shape", "config-experts", "path"],
)
def test_inconsistent_manifest(copy, edit, needle):
    rewrite_manifest(copy, edit)
    with pytest.raises(StoreError, match=needle):
        tokens(copy)


def test_swapped_offsets_caught_by_checksum(model, copy):
    """A manifest that is self-consistent but points an expert at another's blob."""
    a, b = model.used[0], model.used[1]

    def swap(m):
        ea = next(e for e in m["experts"] if (e["layer"], e["expert"]) == a)
        eb = next(e for e in m["experts"] if (e["layer"], e["expert"]) == b)
        ea["offset"], eb["offset"] = eb["offset"], ea["offset"]

    rewrite_manifest(copy, swap)
    with pytest.raises(StoreError, match=rf"layer {a[0]} expert {a[1]}: checksum mismatch"):
        tokens(copy)


def test_edited_manifest_without_checksum(copy):
    text = (copy / "manifest.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06')
    (copy / "manifest.json").write_text(text)
    with pytest.raises(StoreError, match="manifest.json: checksum mismatch"):
        tokens(copy)


def test_garbage_manifest(copy):
    (copy / "manifest.json").write_bytes(b"\x00\xff garbage")
    with pytest.raises(StoreError, match="not valid JSON"):
        tokens(copy)


# ----------------------------------------------------------------------------- resident weights


def test_resident_weights_corrupted(model, copy):
    size = (copy / "resident.safetensors").stat().st_size
    flip(copy / "resident.safetensors", size - 10)
    with pytest.raises(StoreError, match=r"resident.safetensors: tensor '.*': checksum mismatch"):
        tokens(copy)


def test_resident_header_corrupted(copy):
    flip(copy / "resident.safetensors", 3)  # the header length
    with pytest.raises(StoreError, match="resident.safetensors: header length"):
        tokens(copy)


def test_resident_truncated(copy):
    os.truncate(copy / "resident.safetensors", 5000)
    with pytest.raises(StoreError, match="resident.safetensors"):
        tokens(copy)


# ----------------------------------------------------------------------------- I/O errors


def _failing_preadv(*args, **kwargs):
    raise OSError(5, "Input/output error")


def test_io_error_in_reader_surfaces_in_caller(model, copy, monkeypatch):
    engine = edgemoe.load(copy)
    monkeypatch.setattr(os, "preadv", _failing_preadv)
    layer, expert = model.used[0]
    with pytest.raises(StoreError, match=f"layer {layer} expert {expert}: read failed .*Input/output error"):
        engine.generate(PROMPT, max_tokens=1)
    monkeypatch.undo()
    assert engine.generate(PROMPT, max_tokens=N, ignore_eos=True).token_ids == model.ref  # and it recovers
    engine.close()


def test_io_error_in_background_load_reaches_waiter(model, copy, monkeypatch):
    engine = edgemoe.load(copy)
    cache = engine.provider.cache
    monkeypatch.setattr(os, "preadv", _failing_preadv)
    fut = cache.submit(model.used[0])
    with pytest.raises(StoreError, match="Input/output error"):
        fut.result(timeout=30)
    monkeypatch.undo()
    assert cache.submit(model.used[0]).result(timeout=30) is True
    engine.close()


def test_direct_io_refused_falls_back_to_buffered(copy, model, monkeypatch):
    """File systems that accept O_DIRECT at open but refuse the reads (EINVAL)."""
    real = os.preadv
    engine = edgemoe.load(copy)
    direct_fd = engine.provider.cache._store._fd_direct
    if direct_fd < 0:
        pytest.skip("this file system refuses O_DIRECT at open already")

    def preadv(fd, bufs, offset):
        if fd == direct_fd:
            raise OSError(22, "Invalid argument")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    assert engine.generate(PROMPT, max_tokens=N, ignore_eos=True).token_ids == model.ref
    assert engine.provider.stats()["io"] == "buffered"
    engine.close()


# ----------------------------------------------------------------------------- fuzz




def test_fuzz_single_byte_corruptions(model, copy):
    """Many random one-byte corruptions of the store, manifest and resident weights:
    each run gives exactly the in-RAM tokens (the byte was padding or whitespace) or
    raises StoreError. Never other tokens, another exception or a hang."""
    rng = random.Random(1234)
    m = model.manifest
    padding = [(e.offset + e.size, e.offset + e.length) for e in m.experts if e.length > e.size]
    assert padding
    memory = edgemoe.load(copy).info["min_budget_bytes"] + m.experts[0].length  # a small cache: reads and evictions
    outcomes = {"same": 0, "error": 0}
    for trial in range(150):
        kind = rng.choices(["store", "store-padding", "manifest", "resident"], [45, 15, 25, 15])[0]
        if kind == "store-padding":
            name = "experts.bin"
            lo, hi = rng.choice(padding)
            offset = rng.randrange(lo, hi)
        else:
            name = {"store": "experts.bin", "manifest": "manifest.json", "resident": "resident.safetensors"}[kind]
            offset = rng.randrange((copy / name).stat().st_size)
        value = rng.randrange(256)
        old = flip(copy / name, offset, value)
        try:
            with deadline(60):
                try:
                    got = tokens(copy, memory=memory)
                except StoreError:
                    outcomes["error"] += 1
                else:
                    assert got == model.ref, f"trial {trial}: {name}[{offset}] = {value} gave other tokens"
                    outcomes["same"] += 1
        finally:
            flip(copy / name, offset, old)
    assert outcomes["error"] > 50 and outcomes["same"] > 10, outcomes


# ----------------------------------------------------------------------------- command line


def test_cli_reports_corruption_in_one_line(model, copy):
    layer, expert = model.used[0]
    entry = model.manifest.table()[(layer, expert)]
    flip(copy / "experts.bin", entry.offset + 7)
    proc = run_cli("generate", copy, "-p", "def add(a, b):", "-n", "4", "--memory", "10MB")
    assert_clean_error(proc, f"layer {layer} expert {expert}", "checksum mismatch")


def test_cli_missing_and_truncated_store(model, copy):
    os.truncate(copy / "experts.bin", 10_000)
    assert_clean_error(run_cli("generate", copy, "-p", "x", "-n", "2"), "experts.bin: truncated", "layer")
    (copy / "experts.bin").unlink()
    assert_clean_error(run_cli("generate", copy, "-p", "x", "-n", "2"), "experts.bin", "missing")
