"""`edgemoe convert`: layout of the output, plans and formats, atomic output, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib

import pytest
import torch
from safetensors import safe_open

import edgemoe
from edgemoe.errors import EdgeMoEError, ModelLoadError
from edgemoe.models.base import EXPERT_KEY
from edgemoe.quant.formats import get_format
from edgemoe.store.convert import BITS_TO_FORMAT, convert
from edgemoe.store.manifest import ALIGN, HEADER_BYTES, ExpertPlan, read_manifest

from cli.helpers import assert_clean_error, run_cli
from store.helpers import make_checkpoint


@pytest.fixture(scope="module")
def hf(tmp_path_factory, tokenizer_dir):
    return make_checkpoint(tmp_path_factory.mktemp("conv") / "hf", "mixtral", tokenizer_dir)


def test_output_layout(hf, tmp_path):
    out = tmp_path / "out"
    r = convert(hf, out)
    m = read_manifest(out)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["version"] == 1 and raw["format"] == "edgemoe-converted-model"
    assert m.model_type == "mixtral" and m.dtype == "float32" and set(m.formats) == {"fp32"}
    assert len(m.experts) == 3 * 4 == r.experts
    data = (out / "experts.bin").read_bytes()
    assert len(data) == m.store_bytes == r.store_bytes and len(data) % ALIGN == 0
    assert data.startswith(b"EDGEMOE-EXPERT-STORE\n") and m.store_id.encode() in data[:HEADER_BYTES]
    for e in m.experts:  # one contiguous, aligned blob per expert, checksummed
        assert e.offset % ALIGN == 0 and e.length % ALIGN == 0
        assert zlib.crc32(data[e.offset : e.offset + e.size]) == e.crc32
        assert data[e.offset + e.size : e.offset + e.length] == bytes(e.length - e.size)
    # Blob = the kernel's layout: w13 = [gate; up] then w2, as the format encodes them.
    e = m.table()[(1, 2)]
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        p = "model.layers.1.block_sparse_moe.experts.2."
        gate, up, down = (f.get_tensor(p + n + ".weight") for n in ("w1", "w3", "w2"))
    blob = torch.frombuffer(bytearray(data[e.offset : e.offset + e.size]), dtype=torch.float32)
    assert torch.equal(blob[: 2 * 96 * 64].view(192, 64), torch.cat([gate, up]))
    assert torch.equal(blob[2 * 96 * 64 :].view(64, 96), down)
    # Resident weights: everything but routed experts, readable by the safetensors library.
    with safe_open(str(out / "resident.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == set(m.resident_tensors) and not any(EXPERT_KEY.match(n) for n in names)
    assert "layers.2.mlp.router.weight" in names and r.resident_bytes == (out / "resident.safetensors").stat().st_size
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (hf / name).read_bytes()
    assert not list(tmp_path.glob(".out.*"))  # no leftovers


def test_dtype_and_bits(hf, tmp_path):
    m = read_manifest(convert(hf, tmp_path / "bf16", dtype="bfloat16").out)
    assert m.dtype == "bfloat16" and set(m.formats) == {"bf16"}
    assert m.formats["bf16"].size == 3 * 64 * 96 * 2
    for bits, name in BITS_TO_FORMAT.items():
        try:
            get_format(name)
        except EdgeMoEError:
            continue  # a quantized format not registered yet
        m = read_manifest(convert(hf, tmp_path / f"b{bits}", bits=bits).out)
        assert set(m.formats) == {name} and m.dtype == "float32"


def test_plan_gives_each_expert_its_format(hf, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "default": "fp32", "layers": {"2": "fp16"},
                                "experts": {"0.3": "bf16", "2.1": "fp32"}}))
    m = read_manifest(convert(hf, tmp_path / "out", plan=plan).out)
    fmts = {e.key: e.format for e in m.experts}
    assert fmts[(0, 3)] == "bf16" and fmts[(2, 1)] == "fp32" and fmts[(2, 0)] == "fp16" and fmts[(1, 1)] == "fp32"
    assert m.formats["bf16"].size * 2 == m.formats["fp32"].size
    sizes = {e.key: e.size for e in m.experts}
    assert sizes[(0, 3)] < sizes[(0, 2)]  # variable blob sizes in one store


@pytest.mark.parametrize(
    "plan,needle",
    [
        ({"version": 2, "default": "fp32"}, "plan version 2"),
        ({"version": 1}, "'default' must name a format"),
        ({"version": 1, "default": "fp32", "experts": {"0-1": "fp32"}}, "should be"),
        ({"version": 1, "default": "fp32", "experts": {"0.9": "fp32"}}, "no layer 0 expert 9"),
        ({"version": 1, "default": "fp32", "layers": {"7": "fp32"}}, "layer 7 has no routed experts"),
        ({"version": 1, "default": "int13"}, "int13"),
        ({"version": 1, "default": "fp32", "typo": 1}, "unknown key"),
    ],
)
def test_bad_plans_are_refused(hf, tmp_path, plan, needle):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    with pytest.raises(EdgeMoEError, match=needle):
        convert(hf, tmp_path / "out", plan=path)
    assert not (tmp_path / "out").exists()


def test_plan_roundtrip():
    p = ExpertPlan("bf16", {3: "int8"}, {(3, 5): "int4"})
    assert ExpertPlan.from_dict(p.to_dict(), "x") == p
    assert p.format_for(3, 5) == "int4" and p.format_for(3, 4) == "int8" and p.format_for(0, 0) == "bf16"


def test_existing_output_needs_force_and_is_replaced_only_when_complete(hf, tmp_path):
    out = tmp_path / "out"
    convert(hf, out)
    old_id = read_manifest(out).store_id
    with pytest.raises(EdgeMoEError, match="already exists"):
        convert(hf, out)
    with pytest.raises(EdgeMoEError):
        convert(hf, out, force=True, fmt="no-such-format")
    assert read_manifest(out).store_id == old_id  # a failed --force run leaves the old model alone
    convert(hf, out, force=True, dtype="bfloat16")
    assert read_manifest(out).dtype == "bfloat16" and read_manifest(out).store_id != old_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_conversion_leaves_nothing(hf, tmp_path):
    """A checkpoint missing one expert tensor: clear error, no output, no debris."""
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in hf.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.block_sparse_moe.experts.2.w3.weight"}
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="layer 1 expert 2 is missing up weights"):
        convert(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_killed_conversion_leaves_no_valid_directory(tmp_path, tokenizer_dir):
    hf = make_checkpoint(tmp_path / "hf", "mixtral", tokenizer_dir, hidden_size=256, intermediate_size=512,
                         num_local_experts=8, num_hidden_layers=4)  # 50 MB: takes a moment to convert
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "edgemoe", "convert", str(hf), str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    partial = None
    while time.time() < deadline and proc.poll() is None:
        found = list(tmp_path.glob(".out.partial-*/experts.bin"))
        if found and found[0].stat().st_size > 1_000_000:
            partial = found[0].parent
            break
        time.sleep(0.001)
    assert partial is not None, "the conversion finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert not (partial / "manifest.json").exists()
    with pytest.raises(EdgeMoEError):
        edgemoe.load(out)
    convert(hf, out)  # the next conversion cleans up the debris of the killed one
    assert not partial.exists() and read_manifest(out)


def test_cli_summary_json_and_errors(hf, tmp_path):
    proc = run_cli("convert", hf, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "resident weights" in proc.stderr and "expert store" in proc.stderr and "12 experts (fp32 x12)" in proc.stderr
    proc = run_cli("convert", hf, tmp_path / "out2", "--json", "--dtype", "bfloat16")
    r = json.loads(proc.stdout)
    assert r["formats"] == {"bf16": 12} and r["store_bytes"] == (tmp_path / "out2" / "experts.bin").stat().st_size
    assert_clean_error(run_cli("convert", tmp_path / "nope", tmp_path / "o3"), "does not exist")
    assert_clean_error(run_cli("convert", hf, tmp_path / "out"), "already exists")


def test_progress_bar(hf, tmp_path, capsys):
    convert(hf, tmp_path / "out", progress=True)
    assert "converting" in capsys.readouterr().err
