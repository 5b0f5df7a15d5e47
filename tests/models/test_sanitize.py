"""Checkpoint names to ours: per-expert and fused 3-D expert layouts, sharded
checkpoints, and the name mapping of every family."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import save_checkpoint, tiny_config
from safetensors.torch import save_file

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import get_family

FAMILY_CONFIGS = {
    "mixtral": {},
    "qwen2_moe": dict(mlp_only_layers=[1]),  # shared expert and a dense layer next to fused experts
    "qwen3_moe": {},
    "olmoe": {},
}

# The first four families (Llama-style, HF fused layout (E, 2I, H)); the families added
# later have their own checks in tests/models/families/ and test_family_parity.py.
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def per_expert(request, tmp_path_factory):
    """A checkpoint as save_pretrained writes it (one tensor per expert matrix), plus the
    transformers model it came from."""
    family = request.param
    out = tmp_path_factory.mktemp(f"{family}-per-expert")
    hf = save_checkpoint(tiny_config(family, **FAMILY_CONFIGS[family]), out)
    return family, out, hf


def ids() -> torch.Tensor:
    return torch.randint(2, 384, (1, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_fused_expert_layout_loads_like_per_expert(per_expert, tmp_path):
    """transformers 5 keeps experts as gate_up_proj (E, 2I, H) and down_proj (E, H, I);
    a checkpoint written in that layout gives exactly the per-expert logits."""
    family, src, hf = per_expert
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    fused = [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert fused and not any(".experts.0." in k for k in state)
    E, two_i, H = state[next(k for k in fused if k.endswith("gate_up_proj"))].shape
    assert (E, H) == (hf.config.num_local_experts if family == "mixtral" else hf.config.num_experts, 64)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", tmp_path / "config.json")

    model_fused, _ = load_hf(tmp_path)
    model_split, _ = load_hf(src)
    x = ids()
    assert torch.equal(model_fused(x), model_split(x))
    torch.testing.assert_close(model_fused(x), hf(x).logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_sharded_checkpoint_loads(per_expert, tmp_path):
    _, _, hf = per_expert
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    model, _ = load_hf(tmp_path)
    x = ids()
    torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def names(family: str, name: str, shape=(4, 4)) -> list[str]:
    return [n for n, _ in get_family(family).sanitize(name, torch.zeros(shape))]


@pytest.mark.parametrize(
    "family,name,want",
    [
        ("mixtral", "model.layers.3.block_sparse_moe.gate.weight", "layers.3.mlp.router.weight"),
        ("mixtral", "model.layers.3.block_sparse_moe.experts.7.w1.weight", "experts.3.7.gate"),
        ("mixtral", "model.layers.3.block_sparse_moe.experts.7.w3.weight", "experts.3.7.up"),
        ("mixtral", "model.layers.3.block_sparse_moe.experts.7.w2.weight", "experts.3.7.down"),
        ("qwen2_moe", "model.layers.2.mlp.shared_expert.up_proj.weight", "layers.2.mlp.shared.up.weight"),
        ("qwen2_moe", "model.layers.2.mlp.shared_expert_gate.weight", "layers.2.mlp.shared_gate.weight"),
        ("qwen2_moe", "model.layers.2.self_attn.q_proj.bias", "layers.2.attn.q.bias"),
        ("qwen2_moe", "model.layers.0.mlp.down_proj.weight", "layers.0.mlp.down.weight"),  # dense layer
        ("qwen3_moe", "model.layers.1.self_attn.k_norm.weight", "layers.1.attn.k_norm.weight"),
        ("qwen3_moe", "model.layers.1.mlp.gate.weight", "layers.1.mlp.router.weight"),
        ("qwen3_moe", "model.layers.1.mlp.experts.11.gate_proj.weight", "experts.1.11.gate"),
        ("olmoe", "model.layers.0.self_attn.q_norm.weight", "layers.0.attn.q_norm.weight"),
        ("olmoe", "model.layers.0.self_attn.o_proj.bias", "layers.0.attn.o.bias"),
        ("olmoe", "model.layers.0.mlp.experts.5.down_proj.weight", "experts.0.5.down"),
        ("olmoe", "lm_head.weight", "lm_head.weight"),
        ("olmoe", "model.embed_tokens.weight", "embed.weight"),
    ],
)
def test_sanitize_names(family, name, want):
    assert names(family, name) == [want]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sanitize_splits_fused_experts(family):
    E, I, H = 3, 5, 4
    gate_up = torch.arange(E * 2 * I * H, dtype=torch.float32).view(E, 2 * I, H)
    down = torch.arange(E * H * I, dtype=torch.float32).view(E, H, I)
    sanitize = get_family(family).sanitize
    out = dict(sanitize("model.layers.2.mlp.experts.gate_up_proj", gate_up))
    out.update(sanitize("model.layers.2.mlp.experts.down_proj", down))
    assert sorted(out) == sorted(f"experts.2.{e}.{p}" for e in range(E) for p in ("gate", "up", "down"))
    for e in range(E):
        assert torch.equal(out[f"experts.2.{e}.gate"], gate_up[e, :I])
        assert torch.equal(out[f"experts.2.{e}.up"], gate_up[e, I:])
        assert torch.equal(out[f"experts.2.{e}.down"], down[e])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sanitize_rejects_unknown_and_malformed_names(family):
    sanitize = get_family(family).sanitize
    assert sanitize("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(4)) == []
    with pytest.raises(ModelLoadError, match="model.layers.0.mystery.weight"):
        sanitize("model.layers.0.mystery.weight", torch.zeros(4))
    with pytest.raises(ModelLoadError, match="3-D"):
        sanitize("model.layers.0.mlp.experts.down_proj", torch.zeros(4, 4))


def test_qwen2_drops_empty_shared_expert_only():
    sanitize = get_family("qwen2_moe").sanitize
    assert sanitize("model.layers.0.mlp.shared_expert.gate_proj.weight", torch.zeros(0, 8)) == []
    assert names("qwen2_moe", "model.layers.0.mlp.shared_expert_gate.weight", (1, 8)) == [
        "layers.0.mlp.shared_gate.weight"
    ]
