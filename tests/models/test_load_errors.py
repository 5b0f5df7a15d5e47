"""Bad model directories: every problem is a ModelLoadError whose message names the file
or directory, and the CLI prints it as one line with a non-zero exit and no traceback."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_checkpoint, tiny_config
from safetensors.torch import load_file, save_file

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import FAMILIES
from store.helpers import edit_manifest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def good(tmp_path_factory, tokenizer_dir) -> Path:
    """A valid Qwen2-MoE directory (shared expert, biases, a dense layer) with a tokenizer."""
    out = tmp_path_factory.mktemp("good")
    save_checkpoint(tiny_config("qwen2_moe", mlp_only_layers=[1]), out, tokenizer_dir)
    return out


@pytest.fixture
def ckpt(good, tmp_path) -> Path:
    """A private copy of the good directory for a test to break."""
    out = tmp_path / "model"
    shutil.copytree(good, out)
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    hf = save_checkpoint(tiny_config("qwen3_moe"), tmp_path_factory.mktemp("unsharded"))
    hf.save_pretrained(out, max_shard_size="100KB")
    return out


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path: Path, fn) -> None:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def load_error(path: Path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_hf(path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_good_directory_loads(good):
    model, _ = load_hf(good)
    assert model.args.model_type == "qwen2_moe"


def test_missing_directory(tmp_path):
    path = tmp_path / "nowhere"
    msg = load_error(path)
    assert str(path) in msg and "does not exist" in msg


def test_path_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    assert str(path) in load_error(path)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    msg = load_error(ckpt)
    assert str(ckpt / "config.json") in msg and "missing" in msg


def test_invalid_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "qwen2_moe",')
    msg = load_error(ckpt)
    assert str(ckpt / "config.json") in msg and "invalid JSON" in msg


def test_unsupported_model_type_lists_supported(ckpt):
    edit_config(ckpt, model_type="llama")
    msg = load_error(ckpt)
    assert str(ckpt / "config.json") in msg and "'llama'" in msg
    assert f"supported: {', '.join(sorted(FAMILIES))})" in msg  # every family, by name


def test_missing_model_type(ckpt):
    edit_config(ckpt, model_type=None)
    assert "unsupported model_type None" in load_error(ckpt)


def test_missing_required_config_key(ckpt):
    edit_config(ckpt, hidden_size=None)
    msg = load_error(ckpt)
    assert str(ckpt / "config.json") in msg and "hidden_size" in msg


def test_inconsistent_config(ckpt):
    edit_config(ckpt, num_key_value_heads=3)  # 4 heads
    msg = load_error(ckpt)
    assert str(ckpt / "config.json") in msg and "num_key_value_heads" in msg


def test_top_k_larger_than_experts(ckpt):
    edit_config(ckpt, num_experts_per_tok=7)  # 6 experts
    assert "num_experts_per_tok" in load_error(ckpt)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    msg = load_error(ckpt)
    assert str(ckpt) in msg and "no *.safetensors" in msg


def test_pickle_checkpoint_is_refused_and_never_unpickled(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    msg = load_error(ckpt)
    assert str(ckpt) in msg and "pickle" in msg
    assert not marker.exists()


def test_resident_tensor_missing(ckpt):
    edit_tensors(ckpt, lambda t: t.pop("model.layers.0.self_attn.q_proj.weight"))
    msg = load_error(ckpt)
    assert str(ckpt) in msg and "missing tensors: layers.0.attn.q.weight" in msg


def test_expert_tensor_missing(ckpt):
    edit_tensors(ckpt, lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    msg = load_error(ckpt)
    assert str(ckpt) in msg and "layer 2 expert 3 is missing up" in msg


def test_resident_tensor_wrong_shape(ckpt):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1].clone()

    edit_tensors(ckpt, shrink)
    msg = load_error(ckpt)
    assert str(ckpt) in msg and "layers.0.attn.k.weight has shape (31, 64), expected (32, 64)" in msg


def test_expert_tensor_wrong_shape(ckpt):
    def widen(t):
        t["model.layers.0.mlp.experts.1.down_proj.weight"] = torch.zeros(64, 50)

    edit_tensors(ckpt, widen)
    msg = load_error(ckpt)
    assert str(ckpt) in msg and "layer 0 expert 1 down has shape (64, 50), expected (64, 48)" in msg


def test_expert_outside_config(ckpt):
    def extra(t):
        t["model.layers.0.mlp.experts.9.up_proj.weight"] = torch.zeros(48, 64)

    edit_tensors(ckpt, extra)
    assert "layer 0 expert 9 does not fit the config" in load_error(ckpt)


def test_unexpected_tensor_names_the_file(ckpt):
    edit_tensors(ckpt, lambda t: t.__setitem__("model.layers.0.mystery.weight", torch.zeros(2)))
    msg = load_error(ckpt)
    assert str(ckpt / "model.safetensors") in msg and "model.layers.0.mystery.weight" in msg


@pytest.mark.parametrize("keep", [0.5, 0.999, 100, 4])
def test_truncated_safetensors(ckpt, keep):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    file.write_bytes(data[:n])
    msg = load_error(ckpt)
    assert str(file) in msg and "truncated" in msg


def test_missing_shard(sharded, tmp_path):
    path = tmp_path / "sharded"
    shutil.copytree(sharded, path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    msg = load_error(path)
    assert str(shard) in msg and "missing" in msg


def test_invalid_index(sharded, tmp_path):
    path = tmp_path / "sharded"
    shutil.copytree(sharded, path)
    (path / "model.safetensors.index.json").write_text("{}")
    assert str(path / "model.safetensors.index.json") in load_error(path)


# ----------------------------------------------------------------------------- CLI


def cli(path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "edgemoe", "generate", str(path), "--prompt", "x", "--max-tokens", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def assert_cli_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgemoe: error: ")
    for needle in needles:
        assert needle in lines[0]


def test_cli_generates_from_good_directory(good):
    result = cli(good)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_cli_missing_directory(tmp_path):
    assert_cli_error(cli(tmp_path / "nowhere"), str(tmp_path / "nowhere"))


def test_cli_unsupported_model_type(ckpt):
    edit_config(ckpt, model_type="llama")
    assert_cli_error(cli(ckpt), str(ckpt / "config.json"), ", ".join(sorted(FAMILIES)))


def test_cli_truncated_safetensors(ckpt):
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    assert_cli_error(cli(ckpt), str(file))


def test_cli_pickle_only(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not really a pickle")
    assert_cli_error(cli(ckpt), str(ckpt), "pickle")


# ----------------------------------------------------------------------------- config values and tensor dtypes


@pytest.mark.parametrize(
    "changes,fragment",
    [
        (dict(num_experts="6"), "num_experts must be an integer, got '6'"),
        (dict(num_experts_per_tok=2.5), "num_experts_per_tok must be an integer, got 2.5"),
        (dict(rms_norm_eps=0), "rms_norm_eps must be positive"),
        (dict(rope_parameters={"rope_type": "linear", "factor": "x"}), "rope_parameters.factor must be a number"),
        (dict(eos_token_id={"id": 1}), "eos_token_id must be an integer or a list of integers or null"),
        (dict(num_key_value_heads=0), "num_key_value_heads must be positive, got 0"),
        (dict(model_type=["qwen2_moe"]), "model_type must be a string"),
    ],
)
def test_bad_config_values(ckpt, changes, fragment):
    edit_config(ckpt, **changes)
    msg = load_error(ckpt)
    assert str(ckpt / "config.json") in msg and fragment in msg


def test_config_that_is_a_directory(ckpt):
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").mkdir()
    assert str(ckpt / "config.json") in load_error(ckpt)


@pytest.mark.parametrize("dtype,code", [(torch.int16, "I16"), (torch.uint16, "U16"), (torch.int32, "I32"),
                                        (torch.bool, "BOOL"), (torch.uint8, "U8")])
def test_integer_weights_are_refused(ckpt, dtype, code):
    edit_tensors(ckpt, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].to(dtype)))
    msg = load_error(ckpt)
    assert str(ckpt / "model.safetensors") in msg and f"'model.norm.weight' has dtype {code}" in msg


def test_half_and_double_weights_load(ckpt):
    def retype(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.float64)
        t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"].to(torch.float16)

    edit_tensors(ckpt, retype)
    model, _ = load_hf(ckpt, "float32")
    assert model.norm.weight.dtype == torch.float32


@pytest.mark.parametrize(
    "index,fragment",
    [
        ({"weight_map": []}, "weight_map must be a non-empty object"),
        ({"weight_map": {}}, "weight_map must be a non-empty object"),
        ({"weight_map": {"a": 5}}, "'a': 5 is not a shard file name"),
        ({"weight_map": {"a": "../model.safetensors"}}, "is not a shard file name"),
        ([], "weight_map must be a non-empty object"),
        ("{", "invalid JSON"),
    ],
)
def test_broken_index(sharded, tmp_path, index, fragment):
    path = tmp_path / "sharded"
    shutil.copytree(sharded, path)
    file = path / "model.safetensors.index.json"
    file.write_text(index if isinstance(index, str) else json.dumps(index))
    msg = load_error(path)
    assert str(file) in msg and fragment in msg


# ----------------------------------------------------------------------------- converted models


@pytest.fixture(scope="module")
def converted(good, tmp_path_factory) -> Path:
    from edgemoe.store.convert import convert

    out = tmp_path_factory.mktemp("converted") / "model"
    convert(good, out)
    return out


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("num_experts", "6", "config: num_experts must be an integer, got '6'"),
        ("rms_norm_eps", float("nan"), "config: rms_norm_eps must be a finite number"),
        ("sliding_window", -1, "config: sliding_window must be non-negative"),
        ("rope_parameters", [1, 2], "config: rope_parameters must be an object or null"),
        ("eos_token_id", {"id": 1}, "config: eos_token_id must be"),
    ],
)
def test_converted_manifest_config_is_checked(converted, tmp_path, key, value, fragment):
    import edgemoe
    from edgemoe.errors import StoreError

    path = tmp_path / "model"
    shutil.copytree(converted, path)
    file = edit_manifest(path, lambda d: d["config"].__setitem__(key, value))
    with pytest.raises(StoreError) as info:
        edgemoe.load(path)
    msg = str(info.value)
    assert msg.startswith(f"{file}: ") and fragment in msg and "\n" not in msg


@pytest.mark.parametrize("dtype", ["int8", "uint8", 5])
def test_converted_manifest_dtype_must_be_a_float(converted, tmp_path, dtype):
    import edgemoe
    from edgemoe.errors import StoreError

    path = tmp_path / "model"
    shutil.copytree(converted, path)
    file = edit_manifest(path, lambda d: d.__setitem__("dtype", dtype))
    with pytest.raises(StoreError, match="is not a compute dtype") as info:
        edgemoe.load(path)
    assert str(file) in str(info.value)


def test_cli_bad_config_value(ckpt):
    edit_config(ckpt, num_experts_per_tok="2")
    assert_cli_error(cli(ckpt), str(ckpt / "config.json"), "num_experts_per_tok must be an integer, got '2'")


def test_cli_integer_weights(ckpt):
    edit_tensors(ckpt, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].to(torch.int32)))
    assert_cli_error(cli(ckpt), str(ckpt / "model.safetensors"), "has dtype I32")
