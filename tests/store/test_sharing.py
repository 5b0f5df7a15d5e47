"""Experts with identical weights (a merged group, or any that happen to be equal) are
stored once: later ones point at the first one's blob (manifest v4 `shares`), the budget
and `info` count the blob once, the cache reads and holds it once, and the tokens are the
in-RAM model's."""

from __future__ import annotations

import json

import pytest
import torch

import edgemoe
from edgemoe.checkpoint import HFCheckpoint
from edgemoe.compress.rewrite import rewrite
from edgemoe.errors import StoreError
from edgemoe.store import manifest as store_format
from edgemoe.store.manifest import read_manifest

from cli.helpers import run_cli
from store.helpers import PROMPTS, make_checkpoint, make_converted, min_budget, run_prompts

GROUPS = {0: [0, 1, 2], 1: [3]}  # per layer: experts that get expert GROUPS[l][0]'s weights


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("sharing")
    hf = make_checkpoint(d / "hf", "mixtral", tokenizer_dir)  # 3 layers x 4 experts
    canon = dict(HFCheckpoint(hf).tensors())
    replace = {}
    for layer, group in GROUPS.items():
        src = {p: canon[f"experts.{layer}.{group[0]}.{p}"] for p in ("gate", "up", "down")}
        replace.update({(layer, e): src for e in group[1:]})
    rewrite(hf, d / "dup", replace=replace)
    return d / "dup", make_converted(d / "dup", d / "conv")


def test_manifest_points_duplicates_at_one_blob(shared):
    _, conv = shared
    m = read_manifest(conv)
    assert m.version == 4
    by = m.table()
    shares = {e.key: e.shares for e in m.experts if e.shares is not None}
    assert shares == {(0, 1): (0, 0), (0, 2): (0, 0)}  # layer 1 has one member only: nothing shared
    assert by[(0, 1)].offset == by[(0, 0)].offset and by[(0, 2)].crc32 == by[(0, 0)].crc32
    one = by[(1, 0)].length
    assert m.expert_bytes == (len(m.experts) - 2) * one  # two blobs fewer
    assert (conv / "experts.bin").stat().st_size == store_format.HEADER_BYTES + m.expert_bytes


def test_offloaded_tokens_and_cache_hold_blob_once(shared):
    hf, conv = shared
    engine = edgemoe.load(hf)
    ref = run_prompts(engine)
    engine.close()
    for memory in (min_budget(conv), None):
        engine = edgemoe.load(conv, memory=memory, prefetch=False)
        try:
            assert engine.info["expert_bytes"] == read_manifest(conv).expert_bytes
            assert run_prompts(engine) == ref
            stats = engine.generate(PROMPTS[0], max_tokens=4, ignore_eos=True).stats.extra
            if memory is None:  # everything fits: the peak is every distinct blob, once
                assert stats["cache_peak_bytes"] <= read_manifest(conv).expert_bytes
        finally:
            engine.close()


def test_info_reports_sharing(shared):
    _, conv = shared
    proc = run_cli("info", str(conv), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["shared_experts"] == 2 and info["manifest_version"] == 4
    assert info["expert_cache_bytes"] == read_manifest(conv).expert_bytes


def _edit(conv, edit):
    path = conv / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    m["checksum"] = store_format._checksum(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["experts"][1].update(shares=[0, 3]), "shares the blob of layer 0 expert 3 but lists another"),
    (lambda m: m["experts"][1].update(shares=[2, 9]), "which is not an expert with its own blob"),
    (lambda m: m["experts"][1].update(shares=[0, 1]), "which is not an expert with its own blob"),
    (lambda m: m["experts"][1].update(shares="0,0"), r"shares must be \[layer, expert\]"),
])
def test_bad_sharing_is_refused(shared, tmp_path, edit, needle):
    import shutil

    _, conv = shared
    copy = tmp_path / "copy"
    shutil.copytree(conv, copy)
    m = json.loads((copy / "manifest.json").read_text())
    assert m["experts"][1]["shares"] == [0, 0]
    _edit(copy, edit)
    with pytest.raises(StoreError, match=needle):
        read_manifest(copy)


def test_unshared_stores_keep_their_version(tmp_path, tokenizer_dir):
    hf = make_checkpoint(tmp_path / "hf", "mixtral", tokenizer_dir)
    assert torch.is_tensor(next(iter(HFCheckpoint(hf).tensors()))[1])
    assert read_manifest(make_converted(hf, tmp_path / "c")).version == 1
