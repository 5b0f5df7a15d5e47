"""Tiny gpt-oss checkpoints with non-zero expert biases, and their MXFP4 versions written
in the released layout (`*_blocks` (E, rows, G, 16) and `*_scales` (E, rows, G) uint8)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgemoe.quant.mxfp4 import BLOCK_BYTES, quantize


@torch.no_grad()
def randomize_gpt_oss(hf, seed: int = 0) -> None:
    """Give a transformers gpt-oss model non-zero expert biases (its init zeroes them),
    wider router biases and sinks, and one expert per layer large enough that the SwiGLU
    clamps clip."""
    g = torch.Generator().manual_seed(seed)
    for layer in hf.model.layers:
        ex = layer.mlp.experts
        for p in (ex.gate_up_proj, ex.down_proj, layer.mlp.router.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for p in (ex.gate_up_proj_bias, ex.down_proj_bias, layer.mlp.router.bias):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape, generator=g))
        ex.gate_up_proj[0] *= 6


def quantize_fused(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused (E, K, N) transformers expert tensor as released MXFP4: rows are the N
    outputs, blocks run along K. Returns blocks (E, N, G, 16) and scales (E, N, G)."""
    blocks, scales = zip(*(quantize(w[e].T) for e in range(w.shape[0])))
    b = torch.stack(blocks)
    return b.view(*b.shape[:2], -1, BLOCK_BYTES), torch.stack(scales)


@torch.no_grad()
def write_mxfp4_checkpoint(hf, src: Path, out: Path):
    """Write `src` (a float gpt-oss checkpoint saved from `hf`) with its experts as MXFP4
    into `out`; return a copy of `hf` whose experts hold transformers' own dequantization
    of those codes (what the MXFP4 checkpoint means)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(src / "model.safetensors")
    ref = copy.deepcopy(hf)
    for i, layer in enumerate(ref.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.experts.{proj}"
            blocks, scales = quantize_fused(tensors.pop(name))
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
            getattr(layer.mlp.experts, proj).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return ref
