"""Writing tiny GGUF files from tiny transformers checkpoints, the way llama.cpp's
convert_hf_to_gguf.py and llama-quantize do, with the `gguf` package's writer, tensor
name map and quantizers. Only the inverse direction (reading) is edgemoe's code, so a
mistake in one is not mirrored in the other: names come from gguf.TensorNameMap, the
q/k permutation is llama.cpp's formula, metadata keys are the writer's own methods.
One writer serves every architecture (its metadata branches follow convert_hf_to_gguf.py's
classes one by one), hence the length of the module."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

ARCH = {"mixtral": "LLAMA", "qwen2_moe": "QWEN2MOE", "qwen3_moe": "QWEN3MOE", "olmoe": "OLMOE",
        "glm4_moe": "GLM4_MOE", "dots1": "DOTS1", "llama4_text": "LLAMA4", "deepseek_v2": "DEEPSEEK2",
        "deepseek_v3": "DEEPSEEK2", "gpt_oss": "GPT_OSS", "minimax_m2": "MINIMAXM2", "hunyuan_v1_moe": "HUNYUAN_MOE",
        "granitemoe": "GRANITE_MOE", "granitemoeshared": "GRANITE_MOE", "ernie4_5_moe": "ERNIE4_5_MOE",
        "dbrx": "DBRX", "phimoe": "PHIMOE", "exaone_moe": "EXAONE_MOE", "afmoe": "AFMOE", "lfm2_moe": "LFM2MOE",
        "jamba": "JAMBA", "granitemoehybrid": "GRANITE_HYBRID"}
PERMUTED = ("mixtral", "granitemoe", "granitemoeshared", "granitemoehybrid")  # LlamaModel subclasses: q/k rows permuted


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """A plain Q4_K encoder (the gguf package has none): per 32-weight sub-block a range
    [min(x, 0), max(x)] on 16 levels, its scale and offset on 6 bits against per-256 fp16
    super-scales d and dmin. Layout as gguf.quants.Q4_K.dequantize_blocks reads it."""
    rows = w.reshape(-1, 256).astype(np.float32)  # (B, 256)
    n = rows.shape[0]
    sub = rows.reshape(n, 8, 32)
    lo = np.minimum(sub.min(-1), 0)  # (B, 8)
    hi = np.maximum(sub.max(-1), lo + 1e-8)
    scale, offset = (hi - lo) / 15, -lo
    d = np.maximum(scale.max(-1), 1e-10) / 63  # (B,)
    dmin = np.maximum(offset.max(-1), 1e-10) / 63
    d, dmin = d.astype(np.float16), dmin.astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(scale / df), 1, 63).astype(np.uint8)  # (B, 8)
    mn = np.clip(np.round(offset / dminf), 0, 63).astype(np.uint8)
    q = np.clip(np.round((sub + (dminf * mn)[..., None]) / (df * sc)[..., None]), 0, 15).astype(np.uint8)  # (B, 8, 32)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)  # chunk c: low nibble sub-block 2c, high 2c+1
    scales = np.empty((n, 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    blocks = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), scales, qs], axis=1)
    return blocks.reshape(*w.shape[:-1], w.shape[-1] // 256 * 144)


def _encode(arr: np.ndarray, qtype_name: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor; rows that do not fit the type's block
    stay F16, as llama-quantize falls back for odd shapes."""
    import gguf

    if qtype_name in ("F32", "F16"):
        return arr.astype(np.float32 if qtype_name == "F32" else np.float16), None
    qtype = gguf.GGMLQuantizationType[qtype_name]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if arr.shape[-1] % block:
        return arr.astype(np.float16), None
    if qtype_name == "Q4_K":
        return quantize_q4_k(arr), qtype
    return gguf.quants.quantize(arr.astype(np.float32), qtype), qtype


def _decode(data: np.ndarray, raw) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(data, raw) if raw is not None else data.astype(np.float32)


# transformers 5's fused expert tensors, per family: gate_up (E, 2I, H) with the gate first
# and down (E, H, I), except Llama 4 (input-major: (E, H, 2I), (E, I, H)) and gpt-oss
# (input-major with gate and up in alternating columns).
INPUT_MAJOR = ("llama4_text", "gpt_oss")


DBRX_EXPERTS = re.compile(r"ffn\.experts\.mlp\.(w1|v1|w2)$")  # (E * I, H) each


def split_experts(family: str, name: str, a: np.ndarray, experts: int = 0) -> dict[str, np.ndarray] | None:
    """A fused expert tensor of the state dict as llama.cpp's converter stacks it:
    part -> (E, out, in) weights or (E, out) biases; None for any other tensor. DBRX's
    w1 / v1 / w2 (E * I, H) are viewed as (E, I, H), w2 transposed (DbrxModel)."""
    if family == "dbrx" and (m := DBRX_EXPERTS.search(name)):
        t = a.reshape(experts, -1, a.shape[-1])  # (E, I, H)
        return {{"w1": "gate", "v1": "up"}.get(m.group(1), "down"): t if m.group(1) != "w2" else t.transpose(0, 2, 1)}
    if name.endswith("experts.gate_up_proj"):
        t = a.transpose(0, 2, 1) if family in INPUT_MAJOR else a  # (E, 2I, H)
        if family == "gpt_oss":
            return {"gate": t[:, 0::2], "up": t[:, 1::2]}
        return dict(zip(("gate", "up"), np.split(t, 2, axis=1)))
    if name.endswith("experts.gate_up_proj_bias"):  # gpt-oss
        return {"gate_bias": a[:, 0::2], "up_bias": a[:, 1::2]}
    if name.endswith("experts.down_proj"):
        return {"down": a.transpose(0, 2, 1) if family in INPUT_MAJOR else a}
    if name.endswith("experts.down_proj_bias"):
        return {"down_bias": a}
    return None


def fuse_experts(family: str, name: str, p: dict[str, np.ndarray]) -> np.ndarray:
    """The inverse of `split_experts` (for the GGUF's dequantized weights)."""
    if family == "dbrx":
        (part, t), = p.items()
        t = t.transpose(0, 2, 1) if part == "down" else t  # (E, I, H)
        return t.reshape(-1, t.shape[-1])
    if name.endswith("gate_up_proj"):
        if family == "gpt_oss":
            t = np.empty((p["gate"].shape[0], 2 * p["gate"].shape[1], p["gate"].shape[2]), np.float32)
            t[:, 0::2], t[:, 1::2] = p["gate"], p["up"]
        else:
            t = np.concatenate([p["gate"], p["up"]], axis=1)
        return t.transpose(0, 2, 1) if family in INPUT_MAJOR else t
    if name.endswith("gate_up_proj_bias"):
        t = np.empty((p["gate_bias"].shape[0], 2 * p["gate_bias"].shape[1]), np.float32)
        t[:, 0::2], t[:, 1::2] = p["gate_bias"], p["up_bias"]
        return t
    if name.endswith("down_proj"):
        return p["down"].transpose(0, 2, 1) if family in INPUT_MAJOR else p["down"]
    return p["down_bias"]


def mxfp4_repack(w: np.ndarray) -> np.ndarray:
    """Float experts (E, out, in) quantized to MXFP4 the way the gpt-oss release stores them
    (edgemoe's quantizer: codes with the even element in the low nibble, E8M0 exponents),
    then repacked into ggml's MXFP4 blocks by convert_hf_to_gguf.py's
    GptOssModel.repack_mxfp4 / transform_nibble_layout, verbatim in numpy. Returns the raw
    (E, out, in / 32 * 17) uint8 data and the HF-layout codes (E, out, G, 16), exponents
    (E, out, G)."""
    from edgemoe.quant.mxfp4 import quantize

    E, n, k = w.shape
    blocks, scales = quantize(torch.from_numpy(w.reshape(E * n, k)))
    blocks = blocks.numpy().reshape(E, n, k // 32, 16)
    scales = scales.numpy().reshape(E, n, k // 32)
    t = blocks
    t = ((t & 0x0F) << 4) | ((t & 0xF0) >> 4)  # swap nibbles
    a, b = np.split(t, 2, axis=-1)
    a = np.stack([(a & 0xF0).reshape(-1), (a << 4).reshape(-1)], axis=-1).reshape(t.shape).astype(np.uint8)
    b = np.stack([(b >> 4).reshape(-1), (b & 0x0F).reshape(-1)], axis=-1).reshape(t.shape).astype(np.uint8)
    out = a | b
    out = ((out & 0xF0) >> 4) | ((out & 0x0F) << 4)
    raw = np.concatenate([scales[..., None], out], axis=-1).reshape(E, n, k // 32 * 17)
    return raw, blocks, scales


def _rope(cfg) -> tuple[float, dict]:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    if cfg.model_type == "hunyuan_v1_moe" and params.get("rope_type") == "dynamic":
        # HunYuanMoEModel: NTK-alpha baked into the base (with hidden / heads as the dimension).
        dim = cfg.hidden_size // cfg.num_attention_heads
        return theta * params.get("alpha", 1000) ** (dim / (dim - 2)), {}
    return theta, params


def llama3_rope_freqs(cfg, dim: int) -> np.ndarray | None:
    """LlamaModel.generate_extra_tensors: llama3 rope as frequency factors (rope_freqs).
    As the converter, the original context comes from the config's top level (8192 when
    absent), not from the rope parameters."""
    theta, params = _rope(cfg)
    if params.get("rope_type") != "llama3":
        return None
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = cfg.to_dict().get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_metadata(w, cfg, family: str, n_blocks: int, mla_layout: str) -> None:
    """What convert_hf_to_gguf.py's set_gguf_parameters writes for these families."""
    import gguf

    if family == "dbrx":  # DbrxModel writes only these
        w.add_block_count(n_blocks)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_feed_forward_length(cfg.ffn_config.ffn_hidden_size)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.attn_config.kv_n_heads)
        w.add_rope_freq_base(cfg.attn_config.rope_theta)
        w.add_clamp_kqv(cfg.attn_config.clip_qkv)
        w.add_expert_count(cfg.ffn_config.moe_num_experts)
        w.add_expert_used_count(cfg.ffn_config.moe_top_k)
        w.add_layer_norm_eps(1e-5)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        return
    if family == "jamba":  # JambaModel: KV heads per layer, 0 for the Mamba layers
        w.add_block_count(n_blocks)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv([cfg.num_key_value_heads if i >= cfg.attn_layer_offset
                             and (i - cfg.attn_layer_offset) % cfg.attn_layer_period == 0 else 0
                             for i in range(n_blocks)])
        w.add_ssm_conv_kernel(cfg.mamba_d_conv)
        w.add_ssm_inner_size(cfg.mamba_expand * cfg.hidden_size)
        w.add_ssm_state_size(cfg.mamba_d_state)
        w.add_ssm_time_step_rank(cfg.mamba_dt_rank)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        return
    if family == "lfm2_moe":  # TextModel + LFM2MoeModel: KV heads per layer, 0 for the convolutions
        w.add_block_count(n_blocks)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv([cfg.num_key_value_heads if t == "full_attention" else 0 for t in cfg.layer_types])
        w.add_rope_freq_base(_rope(cfg)[0])
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_leading_dense_block_count(cfg.num_dense_layers)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_vocab_size(cfg.vocab_size)
        w.add_shortconv_l_cache(cfg.conv_L_cache)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        return
    w.add_block_count(n_blocks)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_head_count(heads)
    w.add_head_count_kv(1 if family.startswith("deepseek") and mla_layout != "legacy" else kv)
    theta, rope = _rope(cfg)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast), ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
    elif rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    topk = getattr(cfg, "moe_topk", None) or cfg.num_experts_per_tok
    w.add_expert_used_count(topk[0] if isinstance(topk, list) else topk)

    def common_moe(experts: int, expert_ff: int, dense_ff: int | None):
        w.add_expert_count(experts)
        w.add_expert_feed_forward_length(expert_ff)
        if dense_ff is not None:
            w.add_feed_forward_length(dense_ff)

    if family == "mixtral":
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_rope_dimension_count(head_dim)
        w.add_expert_count(cfg.num_local_experts)
    elif family in ("qwen2_moe", "qwen3_moe"):
        common_moe(cfg.num_experts, cfg.moe_intermediate_size, cfg.intermediate_size)
        if family == "qwen2_moe":
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
        else:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
    elif family == "olmoe":
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_expert_count(cfg.num_experts)
        if getattr(cfg, "clip_qkv", None) is not None:
            w.add_clamp_kqv(cfg.clip_qkv)
    elif family in ("glm4_moe", "dots1"):
        common_moe(cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.intermediate_size)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        if family == "glm4_moe":
            w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 0.5)))
        w.add_leading_dense_block_count(cfg.first_k_dense_replace)
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    elif family == "llama4_text":
        # The converter swaps the widths: intermediate_size_mlp is the dense layers'.
        common_moe(cfg.num_local_experts, cfg.intermediate_size, cfg.intermediate_size_mlp)
        w.add_rope_dimension_count(head_dim)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_interleave_moe_layer_step(cfg.interleave_moe_layer_step)
    elif family.startswith("deepseek"):
        common_moe(cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.intermediate_size)
        w.add_leading_dense_block_count(cfg.first_k_dense_replace)
        if cfg.q_lora_rank is not None:
            w.add_q_lora_rank(cfg.q_lora_rank)
        w.add_kv_lora_rank(cfg.kv_lora_rank)
        if mla_layout == "legacy":  # llama.cpp before the MLA-absorption split
            w.add_key_length(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
            w.add_value_length(cfg.v_head_dim)
        else:
            w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
            w.add_value_length(cfg.kv_lora_rank)
            w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
            w.add_value_length_mla(cfg.v_head_dim)
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        if cfg.norm_topk_prob:
            w.add_expert_weights_norm(True)
        if family == "deepseek_v3":
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
            w.add_expert_group_count(cfg.n_group)
            w.add_expert_group_used_count(cfg.topk_group)
        else:
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_rope_dimension_count(cfg.qk_rope_head_dim)
        if rope.get("rope_type") == "yarn" and rope.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    elif family == "minimax_m2":
        common_moe(cfg.num_local_experts, cfg.intermediate_size, cfg.intermediate_size)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_rope_dimension_count(getattr(cfg, "rotary_dim", None)
                                   or int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    elif family == "hunyuan_v1_moe":
        moe = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        common_moe(cfg.num_experts, moe[0] if isinstance(moe, list) else moe, cfg.intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.intermediate_size)
        w.add_expert_shared_count(1)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    elif family in ("granitemoe", "granitemoeshared", "granitemoehybrid"):
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_expert_count(cfg.num_local_experts)
        w.add_rope_dimension_count(cfg.hidden_size // heads)  # GraniteModel drops head_dim
        w.add_attention_scale(cfg.attention_multiplier)
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_logit_scale(cfg.logits_scaling)
        if getattr(cfg, "shared_intermediate_size", 0):
            w.add_expert_shared_feed_forward_length(cfg.shared_intermediate_size)
        if family == "granitemoehybrid":  # GraniteHybridModel: Mamba-2 and per-layer KV heads
            w.add_ssm_conv_kernel(cfg.mamba_d_conv)
            w.add_ssm_state_size(cfg.mamba_d_state)
            w.add_ssm_group_count(cfg.mamba_n_groups)
            w.add_ssm_inner_size(cfg.mamba_expand * cfg.hidden_size)
            w.add_ssm_time_step_rank(cfg.mamba_n_heads)
            w.add_head_count_kv([kv if t == "full_attention" else 0 for t in cfg.layer_types])
            w.add_rope_scaling_finetuned(cfg.position_embedding_type == "rope")
            w.add_context_length(2**20)
    elif family == "ernie4_5_moe":
        common_moe(cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.intermediate_size)
        w.add_interleave_moe_layer_step(cfg.moe_layer_interval)
        w.add_leading_dense_block_count(cfg.moe_layer_start_index)
        w.add_expert_shared_count(cfg.moe_num_shared_experts)
        if cfg.moe_num_shared_experts:  # as Ernie4_5MoeModel writes it
            w.add_expert_shared_feed_forward_length(cfg.intermediate_size // cfg.num_key_value_heads)
    elif family == "phimoe":  # Phi3MiniModel + PhiMoeModel
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_rope_scaling_orig_ctx_len(phimoe_original_context(cfg))
        w.add_rope_dimension_count(head_dim)
        w.add_sliding_window(cfg.sliding_window or 0)
        w.add_expert_count(cfg.num_local_experts)
        if rope.get("rope_type") == "longrope":
            w.add_rope_scaling_attn_factors(phimoe_attn_factor(cfg))
    elif family == "exaone_moe":  # TextModel + Exaone4Model + ExaoneMoEModel
        common_moe(cfg.num_experts, cfg.moe_intermediate_size, cfg.intermediate_size)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
        w.add_expert_shared_count(cfg.num_shared_experts)
        w.add_expert_shared_feed_forward_length(cfg.moe_intermediate_size * cfg.num_shared_experts)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        w.add_leading_dense_block_count(cfg.first_k_dense_replace)
        w.add_nextn_predict_layers(0)
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    elif family == "afmoe":  # LlamaModel + AfmoeModel
        common_moe(cfg.num_experts, cfg.moe_intermediate_size, cfg.intermediate_size)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_expert_shared_count(cfg.num_shared_experts)
        w.add_leading_dense_block_count(cfg.num_dense_layers)
        w.add_expert_weights_scale(cfg.route_scale)
        w.add_sliding_window(cfg.sliding_window)
    elif family == "gpt_oss":
        common_moe(cfg.num_local_experts, cfg.intermediate_size, cfg.intermediate_size)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(cfg.sliding_window)
    else:
        raise ValueError(family)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)


def phimoe_original_context(cfg) -> int:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return (getattr(cfg, "original_max_position_embeddings", None) or rope.get("original_max_position_embeddings")
            or cfg.max_position_embeddings)


def phimoe_attn_factor(cfg) -> float:
    """Phi3MiniModel.generate_extra_tensors' LongRoPE attention factor."""
    orig = phimoe_original_context(cfg)
    scale = cfg.max_position_embeddings / orig
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0


def write_gguf(model, tok_dir: Path | None, out: Path, qtype: str = "F16", expert_qtype: str | None = None,
               split_max_tensors: int = 0, chat_template: str | None = None, legacy_experts: bool = False,
               mla_layout: str = "split", nextn: int = 0):
    """Write `model` (a transformers MoE) as GGUF. qtype applies to the 2-D/3-D weights
    (routers, norms and 1-D tensors stay F32 as llama-quantize leaves them), expert_qtype
    to the routed experts (default: qtype; "MXFP4": gpt-oss's released codes). DeepSeek's
    MLA: mla_layout "split" (attn_k_b / attn_v_b, llama.cpp since mid-2025), "legacy"
    (attn_kv_b) or "both" (ik_llama.cpp). `nextn` appends that many GLM-4.5-style
    multi-token-prediction blocks (block_count counts them; transformers has no such
    layers, so they hold copies of the last layer plus the nextn.* tensors). Returns the
    written file(s) and what the GGUF holds, dequantized, in the state dict's names and
    layout."""
    import gguf

    cfg = model.config
    family = cfg.model_type
    arch = gguf.MODEL_ARCH[ARCH[family]]
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    n_layers = cfg.num_hidden_layers
    tmap = gguf.get_tensor_name_map(arch, n_layers)
    w = gguf.GGUFWriter(out, arch_name, split_max_tensors=split_max_tensors)
    w.add_name(f"tiny {family}")
    write_metadata(w, cfg, family, n_layers + nextn, mla_layout)
    if nextn:
        w.add_nextn_predict_layers(nextn)
    if tok_dir is not None:
        add_tokenizer(w, tok_dir, cfg.vocab_size, chat_template)
    expert_qtype = expert_qtype or qtype

    def add(name: str, data: np.ndarray, raw=None):
        w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw)
        last = f"blk.{n_layers - 1}."
        for i in range(nextn):  # the prediction blocks: the last layer's tensors again
            if name.startswith(last):
                w.add_tensor(f"blk.{n_layers + i}." + name[len(last):], np.ascontiguousarray(data), raw_dtype=raw)

    H = cfg.hidden_size
    for i in range(nextn):
        blk = f"blk.{n_layers + i}.nextn."
        add(blk + "eh_proj.weight", np.full((H, 2 * H), 0.01, np.float16))
        for norm in ("enorm", "hnorm", "shared_head_norm"):
            add(blk + norm + ".weight", np.ones(H, np.float32))

    head_dim = cfg.hidden_size // cfg.num_attention_heads
    freqs = llama3_rope_freqs(cfg, head_dim) if family == "llama4_text" else None
    if freqs is not None:
        add("rope_freqs.weight", freqs)
    rope = _rope(cfg)[1] if family != "dbrx" else {}
    if rope.get("rope_type") == "longrope":  # Phi3MiniModel.generate_extra_tensors
        add("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        add("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    deq: dict[str, np.ndarray] = {}
    for name, t in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        a = t.detach().float().numpy()
        pieces = split_experts(family, name, a, cfg.ffn_config.moe_num_experts if family == "dbrx" else 0)
        if pieces is not None:
            layer = int(re.search(r"(?:layers|blocks)\.(\d+)\.", name).group(1))
            held = {}
            for part, arr in pieces.items():
                base = f"blk.{layer}.ffn_{part.removesuffix('_bias')}_exps"
                if part.endswith("_bias"):
                    data, raw = arr.astype(np.float32), None
                    add(base + ".bias", data)
                elif expert_qtype == "MXFP4":
                    data, _, _ = mxfp4_repack(arr)
                    raw = gguf.GGMLQuantizationType.MXFP4
                    add(base + ".weight", data, raw)
                else:
                    data, raw = _encode(arr, expert_qtype)
                    if legacy_experts:  # old Mixtral layout: one tensor per expert
                        for e in range(data.shape[0]):
                            add(f"blk.{layer}.ffn_{part}.{e}.weight", data[e], raw)
                    else:
                        add(base + ".weight", data, raw)
                held[part] = _decode(data, raw)
            deq[name] = fuse_experts(family, name, held)
            continue
        hf = name.replace("e_score_correction_bias", "e_score_correction.bias")  # the converter's rename
        hf = re.sub(r"(mlp|feed_forward)\.expert_bias$", r"\1.expert_bias.bias", hf)  # AFMoE's and LFM2's rename
        if name.endswith(("conv.conv.weight", "mamba.conv1d.weight")):
            a = a.squeeze(1)  # LFM2, Mamba: the conv op takes (C, L)
        if name.endswith("mamba.A_log"):
            a = -np.exp(a)  # JambaModel and Mamba2Model store A itself
        if family == "granitemoehybrid" and re.search(r"mamba\.(A_log|D)$", name):
            a = a.reshape(-1, 1)  # Mamba2Model: (H, 1)
        if family == "granitemoehybrid" and name.endswith("mamba.norm.weight"):
            a = a.reshape(cfg.mamba_n_groups, -1)  # Mamba2Model: one row per group
        hf = hf.replace("mamba.dt_bias", "mamba.dt_proj.bias")  # Mamba2Model's rename
        # transformers 5's in-memory names for what the converter reads under its on-disk names
        hf = hf.replace("mlp.gate.moe_statics.", "mlp.moe_statics.")
        if family.startswith("granitemoe"):
            hf = hf.replace("block_sparse_moe.router.weight", "block_sparse_moe.router.layer.weight")
        if name.endswith("moe_statics.e_score_correction_bias"):
            a = a.reshape(-1)  # (1, E) on disk; the converter squeezes it
        if name.endswith("shared_mlp.input_linear.weight"):  # GraniteMoeModel: gate rows, then up rows
            gate, up = np.split(a, 2, axis=0)
            for part, arr in (("gate", gate), ("up", up)):
                data, raw = _encode(arr, qtype)
                add(f"blk.{name.split('.')[2]}.ffn_{part}_shexp.weight", data, raw)
            deq[name] = np.concatenate([_decode(*_encode(gate, qtype)), _decode(*_encode(up, qtype))])
            continue
        gname = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gname is None and name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # not on disk (LFM2's architecture has no output tensor)
        assert gname is not None, name
        if not gname.endswith((".weight", ".bias")) and not re.search(r"ssm_[ad]$", gname):
            gname += ".weight"  # gpt-oss's sinks (Mamba's ssm_a and ssm_d have no suffix)
        if a.ndim == 1 or "ffn_gate_inp" in gname or re.search(r"ssm_(a|d|conv1d|norm)\b", gname):  # kept F32
            data, raw = a.astype(np.float32), None
        elif gname.endswith("attn_kv_b.weight"):
            data, raw = a.astype(np.float16), None  # F16 also in quantized files here (see mla_layout)
        else:
            data, raw = _encode(a, qtype)
        deq[name] = _decode(data, raw).reshape(t.shape)
        if name.endswith("mamba.A_log"):
            deq[name] = np.log(-deq[name])
        if family in PERMUTED and re.search(r"[qk]_proj\.(weight|bias)$", name):
            kv = cfg.num_key_value_heads if ".k_proj." in name else cfg.num_attention_heads
            data = llama_cpp_permute(data, cfg.num_attention_heads, kv)  # rows: commutes with row-wise blocks
        if gname.endswith("attn_kv_b.weight") and mla_layout != "legacy":
            # DeepseekV2Model.modify_tensors: kv_b split per head, the key half transposed.
            heads, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
            kv_b = data.reshape(heads, nope + v, -1)
            add(gname.replace("kv_b", "k_b"), kv_b[:, :nope].transpose(0, 2, 1))  # (heads, kv_lora, nope)
            add(gname.replace("kv_b", "v_b"), kv_b[:, nope:])  # (heads, v, kv_lora)
            if mla_layout == "split":
                continue
        add(gname, data, raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    parent = Path(out).parent
    files = [Path(out)]
    if split_max_tensors:
        stem = Path(out).name[: -len(".gguf")]
        files = sorted(parent.glob(f"{stem}-*-of-*.gguf"))
    return files, deq


def reference_model(model, deq: dict[str, np.ndarray]):
    """A copy of `model` whose weights are the GGUF's dequantized values: what llama.cpp
    computes with, the reference for re-quantization error."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name in deq:
                t.copy_(torch.from_numpy(deq[name]).to(t.dtype))
    return ref


def add_tokenizer(w, tok_dir: Path, vocab_size: int, chat_template: str | None = None, pre: str = "gpt-2") -> None:
    """A byte-level BPE vocabulary the way convert_hf_to_gguf.py writes one: every id up
    to the model's vocab_size (gaps as UNUSED [PAD<i>]), added special tokens as CONTROL,
    merges and special ids from gguf.SpecialVocab."""
    import gguf
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if by_id[i] in specials else gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(w, quiet=True)
    if chat_template is not None:
        w.add_chat_template(chat_template)


def spm_tokenizer(out: Path) -> Path:
    """A SentencePiece-style BPE (metaspace, byte fallback, <unk>/<s>/</s>) trained on the
    test corpus, saved as tokenizer.json; the shape of Mixtral's tokenizer."""
    from conftest import CORPUS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


def write_spm_gguf(tok_file: Path, out: Path) -> Path:
    """A GGUF holding only the SentencePiece vocabulary as llama.cpp stores Mixtral's
    (tokenizer.ggml.model "llama": tokens, scores, types, no merges), plus a dummy tensor."""
    import gguf

    data = json.loads(tok_file.read_text())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = []
    for t in tokens:
        if t == "<unk>":
            types.append(gguf.TokenType.UNKNOWN)
        elif t in ("<s>", "</s>"):
            types.append(gguf.TokenType.CONTROL)
        elif t.startswith("<0x") and len(t) == 6:
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    w = gguf.GGUFWriter(out, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])  # sentencepiece BPE: earlier merge, higher score
    w.add_token_types(types)
    w.add_bos_token_id(tokens.index("<s>"))
    w.add_eos_token_id(tokens.index("</s>"))
    w.add_unk_token_id(tokens.index("<unk>"))
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def rewrite_metadata(src: Path, dst: Path, changes: dict) -> Path:
    """A copy of the GGUF `src` with the metadata keys in `changes` set to new values
    (same types), tensors unchanged."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = changes.get(key, field.contents())
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, field.types[0], sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, field.types[0])
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        raw = None if t.tensor_type.name in ("F32", "F16") else t.tensor_type
        data = np.array(t.data)
        w.add_tensor(t.name, data if raw is not None else data.reshape(shape), raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
