"""`edgemoe convert --fallback-bits`: a second, small copy of every expert in its own store
file (manifest version 5), checksummed, shared exactly where the full copies are, and
refused by name where the manifest or the file is inconsistent."""

from __future__ import annotations

import json
import zlib

import pytest
import torch

from edgemoe.checkpoint import HFCheckpoint
from edgemoe.compress.rewrite import rewrite
from edgemoe.errors import EdgeMoEError, StoreError
from edgemoe.quant.formats import get_format
from edgemoe.store import manifest as store_format
from edgemoe.store.convert import convert
from edgemoe.store.manifest import ALIGN, FALLBACK_NAME, HEADER_BYTES, read_manifest
from edgemoe.store.reader import ExpertStore

from cli.helpers import assert_clean_error, run_cli
from store.helpers import make_checkpoint


@pytest.fixture(scope="module")
def hf(tmp_path_factory, tokenizer_dir):
    return make_checkpoint(tmp_path_factory.mktemp("fb") / "hf", "mixtral", tokenizer_dir)


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("fbconv") / "out"
    convert(hf, out, bits=8, fallback_bits=2)
    return out


def test_layout_checksums_and_codes(hf, converted):
    m = read_manifest(converted)
    assert m.version == 5 and m.fallback is not None and m.fallback.file == FALLBACK_NAME
    assert set(m.formats) == {"int8", "int2"}
    data = (converted / FALLBACK_NAME).read_bytes()
    assert len(data) == m.fallback.bytes and data.startswith(b"EDGEMOE-EXPERT-STORE\n")
    assert m.store_id.encode() in data[:HEADER_BYTES]
    fb = m.fallback.table()
    assert set(fb) == set(m.table())
    full = m.table()[(0, 0)]
    assert fb[(0, 0)].length < full.length  # the point of it: fewer bytes per miss
    for e in fb.values():
        assert e.format == "int2" and e.offset % ALIGN == 0
        assert zlib.crc32(data[e.offset : e.offset + e.size]) == e.crc32
    # The blob holds exactly what the format encodes from the checkpoint's floats.
    canon = dict(HFCheckpoint(hf).tensors())
    w = [canon[f"experts.1.2.{p}"] for p in ("gate", "up", "down")]
    want = get_format("int2").encode(*w)
    e = fb[(1, 2)]
    got = data[e.offset : e.offset + e.size]
    for part in m.formats["int2"].parts:
        t = want[part.name].contiguous()
        assert got[part.offset : part.offset + part.nbytes] == t.view(torch.uint8).numpy().tobytes()


def test_reader_reads_and_verifies_fallback(converted):
    store = ExpertStore(converted, fallback=True)
    try:
        e = store.entries[(2, 3)]
        buf = memoryview(bytearray(e.length))
        store.read_into(e, buf)
        store.verify(e, buf)  # the checksum holds
        assert store.bytes_read == e.length and store.path.name == FALLBACK_NAME
    finally:
        store.close()


def test_older_manifests_and_no_fallback(hf, tmp_path):
    out = tmp_path / "plain"
    convert(hf, out)
    m = read_manifest(out)
    assert m.version == 1 and m.fallback is None and not (out / FALLBACK_NAME).exists()
    with pytest.raises(StoreError, match="has no fallback copies.*--fallback-bits"):
        ExpertStore(out, fallback=True)


def test_shared_experts_share_their_fallback(tmp_path, tokenizer_dir):
    hf = make_checkpoint(tmp_path / "hf", "mixtral", tokenizer_dir)
    canon = dict(HFCheckpoint(hf).tensors())
    src = {p: canon[f"experts.0.0.{p}"] for p in ("gate", "up", "down")}
    rewrite(hf, tmp_path / "dup", replace={(0, 1): src, (0, 3): src})
    out = tmp_path / "out"
    convert(tmp_path / "dup", out, fallback_bits=3)
    m = read_manifest(out)
    fb = m.fallback.table()
    assert {e.key: e.shares for e in m.fallback.experts if e.shares} == {(0, 1): (0, 0), (0, 3): (0, 0)}
    assert fb[(0, 1)].offset == fb[(0, 0)].offset and fb[(0, 3)].crc32 == fb[(0, 0)].crc32
    blobs = [e for e in m.fallback.experts if e.shares is None]
    assert m.fallback.bytes == HEADER_BYTES + sum(e.length for e in blobs)


def _edit(out, change) -> None:
    """Rewrite the manifest through `change(dict)`, with a valid checksum."""
    path = out / "manifest.json"
    d = json.loads(path.read_text())
    change(d)
    d["checksum"] = store_format._checksum(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("change, match", [
    (lambda d: d["fallback"]["experts"].pop(), "layer 2 expert 3 has no fallback copy"),
    (lambda d: d["fallback"]["experts"][0].update(crc32=d["fallback"]["experts"][0]["crc32"] ^ 1), None),
    (lambda d: d["fallback"]["experts"][1].update(shares=[0, 0]), "fallback of layer 0 expert 1 shares"),
    (lambda d: d["fallback"]["experts"][1].update(offset=d["fallback"]["experts"][0]["offset"]),
     "fallback of layer 0 expert 0 and layer 0 expert 1 overlap"),
    (lambda d: d["fallback"].update(bytes=ALIGN), "fallback of layer 0 expert 0: blob ends past the end"),
    (lambda d: d["fallback"].update(file="../x"), "invalid file name"),
])
def test_bad_fallback_manifest_refused(converted, tmp_path, change, match):
    import shutil

    out = tmp_path / "m"
    shutil.copytree(converted, out)
    _edit(out, change)
    if match is None:  # a wrong checksum: refused when that blob is read and verified
        store = ExpertStore(out, fallback=True)
        try:
            e = store.entries[(0, 0)]
            buf = memoryview(bytearray(e.length))
            store.read_into(e, buf)
            with pytest.raises(StoreError, match=f"{FALLBACK_NAME}: layer 0 expert 0: checksum mismatch"):
                store.verify(e, buf)
        finally:
            store.close()
        return
    with pytest.raises(StoreError, match=match):
        read_manifest(out)


def test_truncated_fallback_file_refused(converted, tmp_path):
    import shutil

    out = tmp_path / "t"
    shutil.copytree(converted, out)
    with open(out / FALLBACK_NAME, "r+b") as f:
        f.truncate(HEADER_BYTES + ALIGN)
    with pytest.raises(StoreError, match=f"{FALLBACK_NAME}: truncated"):
        ExpertStore(out, fallback=True)


def test_flags_refused_by_name(hf, tmp_path):
    with pytest.raises(EdgeMoEError, match="--fallback-bits must be one of 2, 3, got 4"):
        convert(hf, tmp_path / "a", fallback_bits=4)
    with pytest.raises(EdgeMoEError, match="at most one of --fallback-bits and --fallback-format"):
        convert(hf, tmp_path / "a", fallback_bits=2, fallback_format="int2")
    with pytest.raises(EdgeMoEError, match="unknown expert format 'int9'"):
        convert(hf, tmp_path / "a", fallback_format="int9")
    assert not (tmp_path / "a").exists()
    r = run_cli("convert", hf, tmp_path / "b", "--fallback-bits", "5")
    assert r.returncode == 2 and "--fallback-bits" in r.stderr
    r = run_cli("convert", hf, tmp_path / "b", "--fallback-format", "int9")
    assert_clean_error(r, "unknown expert format 'int9'")


def test_cli_convert_prints_fallback(hf, tmp_path):
    r = run_cli("convert", hf, tmp_path / "c", "--fallback-bits", "3", "--bits", "4")
    assert r.returncode == 0, r.stderr
    assert "fallback copies" in r.stderr and "int3" in r.stderr
    assert read_manifest(tmp_path / "c").fallback.experts[0].format == "int3"
    r = run_cli("info", tmp_path / "c", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["fallback"] == {"format": "int3", "bytes": read_manifest(tmp_path / "c").fallback.bytes,
                                "file": FALLBACK_NAME}
    assert FALLBACK_NAME in info["files"]
