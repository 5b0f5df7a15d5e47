"""`edgemoe convert MODEL.gguf` for the GGUF architectures beyond the first four: each
built from a tiny transformers checkpoint, written the way llama.cpp's converter names
and lays out its tensors (tests/store/gguf_helpers.py, metadata included), converted,
and run.

- F16: the checkpoint is saved in fp16, so the GGUF holds exactly its weights and the
  converted model (fp32 compute) must give transformers' logits within 1e-3, and those
  of the same checkpoint converted from its Hugging Face directory within 1e-5.
- Q8_0: converted with `--format fp32` the model must give transformers' logits on the
  GGUF's own dequantized weights within 1e-3 (reading is exact); with the default plan
  (int8 experts) greedy tokens are identical in RAM and offloaded under a budget.
- gpt-oss's MXFP4 experts are stored code for code.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers as tf
from conftest import save_checkpoint

import edgemoe
from edgemoe.errors import ModelLoadError
from edgemoe.store.convert import convert
from edgemoe.store.manifest import read_manifest
from edgemoe.store.gguf import GGUFCheckpoint
from edgemoe.store.gguf_rope import _llama3_factors, llama3_from_factors

from store.gguf_helpers import llama3_rope_freqs, mxfp4_repack, reference_model, rewrite_metadata, write_gguf
from store.helpers import offloaded_prompts, run_prompts

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, max_position_embeddings=512, tie_word_embeddings=False,
            hidden_size=64, num_attention_heads=4, head_dim=16)
MLA_BASE = {k: v for k, v in BASE.items() if k != "head_dim"}  # MLA's head sizes are its own
PHIMOE_MSCALE = math.sqrt(1 + math.log(512 / 128) / math.log(128))  # Phi3MiniModel's attn_factor for 512 / 128

# Tiny configs within what llama.cpp's metadata can say (one expert group for GLM and
# dots1, whose converters write none; Llama 4's fixed chunk, NoPE and temperature
# settings), every expert row a whole number of Q8_0 and MXFP4 blocks.
CONFIGS = {
    # Dense layer 0, 8 experts top-3 with scaling and renormalisation, 2 shared experts,
    # q/k norm, q/k/v bias, partial RoPE; one multi-token-prediction block in the file.
    "glm4moe": lambda: tf.Glm4MoeConfig(
        **BASE, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_key_value_heads=2,
        n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, n_shared_experts=2, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True),
    "dots1": lambda: tf.Dots1Config(
        **BASE, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_key_value_heads=2,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        norm_topk_prob=True, routed_scaling_factor=2.0, sliding_window=None),
    # Maverick-shaped (dense and MoE layers alternate) with llama.cpp's fixed settings and
    # llama3 rope whose smoothed band holds two of the 8 frequencies.
    "llama4": lambda: tf.Llama4TextConfig(
        **BASE, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=8192,
        no_rope_layer_interval=4, floor_scale=8192, attn_scale=0.1, use_qk_norm=True, attn_temperature_tuning=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=8.0, original_max_position_embeddings=8192)),
    # q LoRA, sigmoid grouped routing with correction bias, YaRN with mscale.
    "deepseek_v3": lambda: tf.DeepseekV3Config(
        **MLA_BASE, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                             mscale=1.0, mscale_all_dim=1.0, beta_fast=32, beta_slow=1)),
    # V2-Lite-shaped: no q LoRA, softmax routing, no renormalisation.
    "deepseek_v2": lambda: tf.DeepseekV2Config(
        **MLA_BASE, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_key_value_heads=4, n_routed_experts=6, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=2, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=16, routed_scaling_factor=1.0, norm_topk_prob=False, topk_method="greedy"),
    # Sigmoid routing with correction bias, full-width q/k norms, half of each head rotated.
    "minimax_m2": lambda: tf.MiniMaxM2Config(
        **BASE, intermediate_size=32, num_hidden_layers=3, num_key_value_heads=2, rotary_dim=8,
        num_local_experts=8, num_experts_per_tok=2),
    # NTK-alpha rope (baked into the base by the converter), a per-layer top-k list,
    # q/k norms after RoPE, biases on all four projections, tied embeddings.
    "hunyuan_moe": lambda: tf.HunYuanMoEV1Config(
        **{**BASE, "tie_word_embeddings": True}, intermediate_size=32, num_hidden_layers=3, num_key_value_heads=2,
        num_experts=6, moe_topk=[2, 2, 2], attention_bias=True,
        rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0}),
    # Every multiplier away from 1, attention bias (permuted with q/k), a shared MLP.
    "granitemoe": lambda: tf.GraniteMoeSharedConfig(
        **{k: v for k, v in BASE.items() if k != "head_dim"}, intermediate_size=32, shared_intermediate_size=64,
        num_hidden_layers=3, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        attention_bias=True, embedding_multiplier=6.0, attention_multiplier=0.05, residual_multiplier=0.4,
        logits_scaling=3.0, pad_token_id=None),
    # MoE on layers 1-2 of 4 (the file holds no routers past the end index), two shared
    # experts, interleaved RoPE, tied embeddings.
    "ernie4_5_moe": lambda: tf.Ernie4_5_MoeConfig(
        **{**BASE, "tie_word_embeddings": True}, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=4, num_key_value_heads=2, moe_num_experts=6, moe_k=2, moe_num_shared_experts=2,
        moe_layer_start_index=1, moe_layer_end_index=2),
    # Released rope (YaRN, factor 32), sliding window 8 on even layers, sinks, biases.
    "gpt_oss": lambda: tf.GptOssConfig(
        **BASE, intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8),
    # Fused qkv clamped at 0.3, GQA, LayerNorms without bias, every expert in (E * I, H) slabs.
    "dbrx": lambda: tf.DbrxConfig(
        vocab_size=384, bos_token_id=0, eos_token_id=1, max_seq_len=512, tie_word_embeddings=False, d_model=64,
        n_heads=4, n_layers=2, attn_config={"clip_qkv": 0.3, "kv_n_heads": 2, "rope_theta": 5e5},
        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
        rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    # LongRoPE (factors as tensors, the converter's attention factor as both mscales),
    # biases on attention and the LM head, LayerNorms with bias, SparseMixer routing.
    "phimoe": lambda: tf.PhimoeConfig(
        **BASE, intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=4,
        attention_bias=True, lm_head_bias=True, rope_parameters=dict(
            rope_type="longrope", rope_theta=1e6, short_factor=[1.0 + 0.1 * i for i in range(8)],
            long_factor=[2.0 + 0.1 * i for i in range(8)], short_mscale=PHIMOE_MSCALE, long_mscale=PHIMOE_MSCALE,
            original_max_position_embeddings=128)),
    # Sliding window 8 with RoPE only on the sliding layers, a dense first layer, a shared
    # expert, sigmoid routing with correction bias, q/k norms.
    "exaone_moe": lambda: tf.ExaoneMoeConfig(
        **BASE, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        routed_scaling_factor=2.5, norm_topk_prob=True, n_group=1, topk_group=1),
    # MuP embeddings, gated attention, sandwich norms, every fourth layer global (llama.cpp's
    # fixed settings), a dense first layer, a shared expert, sigmoid routing with bias.
    "afmoe": lambda: tf.AfmoeConfig(
        **BASE, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=1, route_scale=2.0,
        sliding_window=8, global_attn_every_n_layers=4, mup_enabled=True),
    # Short convolutions in layers 0 and 2 (0 KV heads in the file), attention in 1 and 3,
    # a dense first layer, sigmoid routing with expert bias, tied embeddings.
    "lfm2_moe": lambda: tf.Lfm2MoeConfig(
        **{k: v for k, v in BASE.items() if k not in ("head_dim", "tie_word_embeddings")}, intermediate_size=96,
        moe_intermediate_size=32, num_hidden_layers=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        num_dense_layers=1, layer_types=["conv", "full_attention", "conv", "full_attention"],
        tie_word_embeddings=True),
    # Mamba layers 0 and 2 (0 KV heads), attention in 1 and 3, experts in 1 and 3 and a
    # dense MLP elsewhere, raw top-2 softmax weights.
    "jamba": lambda: tf.JambaConfig(
        **{k: v for k, v in BASE.items() if k != "head_dim"}, intermediate_size=32, num_hidden_layers=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
        expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8, use_mamba_kernels=False),
    # Mamba-2 in layers 0 and 2 (two B/C groups, (H, 1) A and D in the file), attention
    # without RoPE in 1 and 3, experts plus a shared MLP everywhere, the four multipliers.
    "granitehybrid": lambda: tf.GraniteMoeHybridConfig(
        **{k: v for k, v in BASE.items() if k != "head_dim"}, intermediate_size=32, shared_intermediate_size=64,
        num_hidden_layers=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["mamba", "attention", "mamba", "attention"], mamba_n_heads=8, mamba_n_groups=2,
        mamba_d_state=8, mamba_d_head=16, mamba_expand=2, mamba_chunk_size=8, embedding_multiplier=6.0,
        attention_multiplier=0.05, residual_multiplier=0.4, logits_scaling=3.0),
}
# Writer options per architecture: GLM-4.5's prediction block; DeepSeek's two MLA layouts.
OPTIONS = {"glm4moe": dict(nextn=1), "deepseek_v2": dict(mla_layout="legacy")}
FAMILY = {"glm4moe": "glm4_moe", "dots1": "dots1", "llama4": "llama4_text", "deepseek_v3": "deepseek_v3",
          "deepseek_v2": "deepseek_v2", "gpt_oss": "gpt_oss", "minimax_m2": "minimax_m2",
          "hunyuan_moe": "hunyuan_v1_moe", "granitemoe": "granitemoeshared", "ernie4_5_moe": "ernie4_5_moe",
          "dbrx": "dbrx", "phimoe": "phimoe", "exaone_moe": "exaone_moe", "afmoe": "afmoe", "lfm2_moe": "lfm2_moe",
          "jamba": "jamba", "granitehybrid": "granitemoehybrid"}


def ids(vocab: int, batch: int = 2, n: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def _correction_biases(hf) -> None:
    """Non-zero routing correction biases (around -1, so a wrong sign or a lost bias
    changes the chosen experts)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, b in [*hf.named_buffers(), *hf.named_parameters()]:  # AFMoE's expert_bias is a parameter
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                b.copy_(-1.0 + 0.3 * torch.randn(b.shape, generator=g))


def fp16_checkpoint(name: str, out, tokenizer_dir):
    """A random checkpoint of config `name` saved in fp16, loaded back in fp32: weights a
    F16 GGUF holds exactly, and fp32 RoPE tables (an fp16 model cast back to fp32 keeps
    fp16-rounded inverse frequencies, off by ~1e-3 in the logits)."""
    hf = save_checkpoint(CONFIGS[name](), out, tokenizer_dir, dtype=torch.float16)
    _correction_biases(hf)
    hf.save_pretrained(out)
    return tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def arch(request, tmp_path_factory, tokenizer_dir):
    """(name, transformers model in fp32 with fp16-exact weights, work dir)."""
    name = request.param
    d = tmp_path_factory.mktemp(f"gguf-{name}")
    return name, fp16_checkpoint(name, d / "hf", tokenizer_dir), d


@torch.no_grad()
def logits(path, x) -> torch.Tensor:
    engine = edgemoe.load(path, mode="io-free")
    try:
        return engine.model(x)
    finally:
        engine.close()


def in_ram_and_offloaded(out) -> None:
    engine = edgemoe.load(out, mode="io-free")
    try:
        want = run_prompts(engine)
    finally:
        engine.close()
    assert offloaded_prompts(out) == want


@torch.no_grad()
def test_f16_matches_transformers(arch, tokenizer_dir):
    name, hf, d = arch
    (path,), _ = write_gguf(hf, tokenizer_dir, d / "F16.gguf", "F16", **OPTIONS.get(name, {}))
    result = convert(path, d / "f16", dtype="float32")
    m = read_manifest(d / "f16")
    assert m.model_type == FAMILY[name] and result.experts == len(m.experts)
    cfg = json.loads((d / "f16" / "config.json").read_text())
    assert cfg.get("num_hidden_layers", cfg.get("n_layers")) == hf.config.num_hidden_layers  # GLM's MTP block dropped
    x = ids(hf.config.vocab_size)
    got = logits(d / "f16", x)
    torch.testing.assert_close(got, hf(x).logits, atol=1e-3, rtol=0)
    # The same model converted from the Hugging Face directory computes the same.
    convert(d / "hf", d / "from-hf", dtype="float32")
    torch.testing.assert_close(got, logits(d / "from-hf", x), atol=1e-5, rtol=0)
    in_ram_and_offloaded(d / "f16")


@torch.no_grad()
def test_q8_0_reads_exactly_and_runs_offloaded(arch, tokenizer_dir):
    name, hf, d = arch
    expert_qtype = "MXFP4" if name == "gpt_oss" else None
    (path,), deq = write_gguf(hf, tokenizer_dir, d / "Q8_0.gguf", "Q8_0", expert_qtype=expert_qtype,
                              **OPTIONS.get(name, {}))
    ckpt = GGUFCheckpoint(path)
    assert set(t for types in ckpt.expert_types().values() for t in types) == {expert_qtype or "Q8_0"}
    x = ids(hf.config.vocab_size)
    convert(path, d / "q8-fp32", dtype="float32", fmt="fp32")
    torch.testing.assert_close(logits(d / "q8-fp32", x), reference_model(hf, deq)(x).logits, atol=1e-3, rtol=0)
    result = convert(path, d / "q8", dtype="float32")
    assert set(result.formats) == {"mxfp4" if expert_qtype else "int8"}
    in_ram_and_offloaded(d / "q8")


@torch.no_grad()
def test_granitehybrid_attention_layers_found_by_their_tensors(tmp_path, tokenizer_dir):
    """llama.cpp's converter, given a transformers 5 config (layer_types "full_attention"
    rather than the released "attention"), writes 0 KV heads for every layer: the
    attention layers are then found by their tensors, with the same logits."""
    hf = fp16_checkpoint("granitehybrid", tmp_path / "hf", tokenizer_dir)
    (path,), _ = write_gguf(hf, tokenizer_dir, tmp_path / "m.gguf", "F16")
    zeros = rewrite_metadata(path, tmp_path / "zeros.gguf", {"granitehybrid.attention.head_count_kv": [0] * 4})
    convert(zeros, tmp_path / "out", dtype="float32")
    x = ids(hf.config.vocab_size)
    torch.testing.assert_close(logits(tmp_path / "out", x), hf(x).logits, atol=1e-3, rtol=0)


def stored_parts(out, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """One expert's tensors as the store file holds them."""
    m = read_manifest(out)
    e = m.table()[(layer, expert)]
    with open(out / m.store_file, "rb") as f:
        f.seek(e.offset)
        blob = bytearray(f.read(e.size))
    return {p.name: torch.frombuffer(blob[p.offset: p.offset + p.nbytes], dtype=p.dtype).view(tuple(p.shape))
            for p in m.formats[e.format].parts}


def test_gpt_oss_mxfp4_codes_are_kept(tmp_path, tokenizer_dir):
    """gpt-oss's MXFP4 experts become edgemoe's mxfp4 format bit for bit: ggml's blocks
    are unpacked into exactly the codes and exponents the release (and the converter's
    input) had, and the stored expert holds them unchanged."""
    hf = fp16_checkpoint("gpt_oss", tmp_path / "hf", tokenizer_dir)
    (path,), _ = write_gguf(hf, tokenizer_dir, tmp_path / "m.gguf", "F16", expert_qtype="MXFP4")
    result = convert(path, tmp_path / "out", dtype="float32")
    assert result.formats == {"mxfp4": 8} and result.added_error == {
        "MXFP4 -> mxfp4": {"experts": 8, "rel_rms": 0.0, "worst": 0.0}}
    gate_up = hf.model.layers[1].mlp.experts.gate_up_proj.detach().numpy().transpose(0, 2, 1)  # (E, 2I, H)
    _, g_blocks, g_scales = mxfp4_repack(np.ascontiguousarray(gate_up[:, 0::2]))
    _, u_blocks, u_scales = mxfp4_repack(np.ascontiguousarray(gate_up[:, 1::2]))
    parts = stored_parts(tmp_path / "out", 1, 3)
    want = np.concatenate([g_blocks[3], u_blocks[3]]).reshape(64, -1)
    assert np.array_equal(parts["w13.blocks"].numpy(), want)
    assert np.array_equal(parts["w13.scales"].numpy(), np.concatenate([g_scales[3], u_scales[3]]))


def test_deepseek_mla_layouts_read_the_same(tmp_path, tokenizer_dir):
    """attn_kv_b (older llama.cpp), attn_k_b + attn_v_b (newer, key half transposed) and
    all three (ik_llama.cpp) give the same tensors."""
    hf = fp16_checkpoint("deepseek_v3", tmp_path / "hf", tokenizer_dir)
    got = {}
    for layout in ("legacy", "split", "both"):
        (path,), _ = write_gguf(hf, tokenizer_dir, tmp_path / f"{layout}.gguf", "F16", mla_layout=layout)
        ckpt = GGUFCheckpoint(path)
        got[layout] = dict(ckpt.tensors())
        assert ckpt.config["qk_nope_head_dim"] == 16 and ckpt.config["v_head_dim"] == 16
    for layout in ("split", "both"):
        assert got[layout].keys() == got["legacy"].keys()
        assert all(torch.equal(got[layout][k], got["legacy"][k]) for k in got["legacy"])
    want = hf.model.layers[0].self_attn.kv_b_proj.weight.detach()
    assert torch.equal(got["split"]["layers.0.attn.kv_b.weight"].float(), want)


@pytest.mark.parametrize("low, high, theta, dim", [
    (1.0, 8.0, 10000.0, 16),  # two frequencies in the smoothed band
    (1.0, 4.0, 10000.0, 16),  # one
    (1.0, 1.0, 500000.0, 128),  # Llama 4's hard cut
    (1.0, 4.0, 500000.0, 128),  # Llama 3.1's band
])
def test_llama3_rope_recovered_from_frequency_factors(low, high, theta, dim):
    """The rope_freqs factors the converter writes give back llama3 parameters that
    reproduce them, whatever the band holds."""
    cfg = tf.Llama4TextConfig(**{**BASE, "head_dim": dim}, rope_parameters=dict(
        rope_type="llama3", rope_theta=theta, factor=8.0, low_freq_factor=low, high_freq_factor=high,
        original_max_position_embeddings=8192))
    ff = llama3_rope_freqs(cfg, dim)
    params = llama3_from_factors(ff, theta, dim, None, "x.gguf")
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    p = params
    if p["low_freq_factor"] == p["high_freq_factor"]:
        got = np.where(2 * np.pi / inv < p["original_max_position_embeddings"] / p["high_freq_factor"], 1.0, 8.0)
    else:
        got = _llama3_factors(inv, p["factor"], p["low_freq_factor"], p["high_freq_factor"],
                              p["original_max_position_embeddings"])
    np.testing.assert_allclose(got, ff, rtol=1e-5)
    # edgemoe's rope tables from those parameters: the converter's frequencies / factors.
    from edgemoe.models.rope import rope_frequencies

    table, _ = rope_frequencies(dim, theta, params)
    base = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    torch.testing.assert_close(table, base / torch.from_numpy(ff), rtol=1e-5, atol=0)
    assert llama3_from_factors(np.ones(dim // 2), theta, dim, None, "x.gguf") is None
    with pytest.raises(ModelLoadError, match="x.gguf: tensor rope_freqs.weight holds frequency factors that are not"):
        llama3_from_factors(np.linspace(1, 8, dim // 2)[::-1].copy(), theta, dim, None, "x.gguf")
