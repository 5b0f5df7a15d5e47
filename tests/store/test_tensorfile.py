"""safetensors files read with pread and written without a serialised copy; both
directions are compatible with the safetensors library."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from edgemoe.store.tensorfile import TensorFileError, iter_tensors, read_header, write_tensors


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.bf16": torch.randn(7, 2, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(4, generator=g).half(),
        "d.i8": torch.randint(-128, 127, (6, 3), dtype=torch.int8, generator=g),
        "e.bool": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 4),
        "g.scalar": torch.tensor(2.5),
    }


def test_written_files_read_back_here_and_in_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    size = write_tensors(path, sample(), {"format": "pt"})
    assert size == path.stat().st_size
    n = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + n) % 4096 == 0  # data starts on a page boundary
    ours = dict(iter_tensors(path))
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        theirs = {k: f.get_tensor(k) for k in f.keys()}
    for name, t in sample().items():
        assert torch.equal(ours[name], t) and ours[name].dtype == t.dtype
        assert torch.equal(theirs[name], t)


def test_reads_files_written_by_safetensors(tmp_path):
    path = tmp_path / "y.safetensors"
    save_file(sample(), str(path))
    got = dict(iter_tensors(path, ["b.bf16", "a.f32"]))
    assert set(got) == {"a.f32", "b.bf16"}
    assert torch.equal(got["b.bf16"], sample()["b.bf16"])


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda raw: raw[:5], "too short"),
        (lambda raw: (10**9).to_bytes(8, "little") + raw[8:], "header length"),
        (lambda raw: raw[:8] + b"[" + raw[9:], "not valid JSON"),
        (lambda raw: raw[: len(raw) - 16], "extends past the end"),
    ],
    ids=["short", "header-length", "json", "truncated"],
)
def test_damaged_files_are_refused(tmp_path, damage, needle):
    path = tmp_path / "z.safetensors"
    write_tensors(path, sample())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(TensorFileError, match=needle):
        list(iter_tensors(path))


def test_inconsistent_header_is_refused(tmp_path):
    path = tmp_path / "h.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(TensorFileError, match="do not match shape"):
        read_header(path)
    header = json.dumps({"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(TensorFileError, match="unknown dtype"):
        read_header(path)
