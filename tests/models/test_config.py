"""config.json parsing per family, for hub-style (transformers 4) configs as well as the
ones transformers 5 writes: MoE layer placement, sliding windows, rope and aliases,
compared with transformers' own config classes where it derives a value."""

from __future__ import annotations

import pytest
import transformers as tf

from edgemoe.errors import ModelLoadError
from edgemoe.models import get_family


def args_of(config: dict):
    return get_family(config["model_type"]).ModelArgs.from_dict(config)


# Shrunk versions of real hub configs (Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B, OLMoE-1B-7B),
# in the legacy layout: rope_theta at the top level, no layer_types.
QWEN2 = dict(
    model_type="qwen2_moe", vocab_size=100, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=48,
    num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, rope_theta=1000000.0,
    rope_scaling=None, use_sliding_window=False, sliding_window=32768, max_window_layers=21, qkv_bias=True,
)
QWEN3 = dict(
    model_type="qwen3_moe", vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
    num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1000000.0,
    rope_scaling=None, use_sliding_window=False, sliding_window=None, max_window_layers=48, attention_bias=False,
)
OLMOE = dict(
    model_type="olmoe", vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
    clip_qkv=None, rope_theta=10000.0, rope_scaling=None, attention_bias=False,
)


def test_hub_configs_parse():
    q2, q3, ol = args_of(QWEN2), args_of(QWEN3), args_of(OLMOE)
    assert (q2.experts_per_layer, q2.top_k, q2.expert_dim, q2.moe_layers()) == (8, 4, 16, list(range(6)))
    assert (q3.experts_per_layer, q3.top_k, q3.expert_dim, q3.head_dim) == (8, 2, 16, 16)
    assert (ol.experts_per_layer, ol.top_k, ol.expert_dim, ol.head_dim) == (8, 2, 16, 8)
    assert q2.rope_theta == q3.rope_theta == 1e6 and q2.rope_scaling is None
    assert ol.rms_norm_eps == 1e-5  # OLMoE's default differs from the Qwen ones
    assert all(q2.window(i) is None for i in range(6))  # use_sliding_window is false
    assert q3.sliding_window is None


@pytest.mark.parametrize(
    "changes",
    [
        dict(decoder_sparse_step=2),
        dict(decoder_sparse_step=3, mlp_only_layers=[5]),
        dict(mlp_only_layers=[0, 3]),
        dict(num_experts=0, num_experts_per_tok=0),
    ],
)
@pytest.mark.parametrize("base", [QWEN2, QWEN3], ids=["qwen2_moe", "qwen3_moe"])
def test_moe_layers_follow_sparse_step_and_mlp_only_layers(base, changes):
    cfg = {**base, **changes}
    hf_cls = tf.Qwen2MoeConfig if cfg["model_type"] == "qwen2_moe" else tf.Qwen3MoeConfig
    hf = hf_cls(**{k: v for k, v in cfg.items() if k != "model_type"})
    want = [
        i for i in range(hf.num_hidden_layers)
        if i not in hf.mlp_only_layers and hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0
    ]
    assert args_of(cfg).moe_layers() == want


@pytest.mark.parametrize("layers,max_window", [(6, 21), (6, 3), (5, 0)])
def test_qwen2_sliding_layers_derived_like_transformers(layers, max_window):
    """Configs without layer_types get transformers' rule for which layers slide."""
    cfg = {**QWEN2, "num_hidden_layers": layers, "use_sliding_window": True, "sliding_window": 16,
           "max_window_layers": max_window}
    hf = tf.Qwen2MoeConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    want = [16 if t == "sliding_attention" else None for t in hf.layer_types]
    args = args_of(cfg)
    assert [args.window(i) for i in range(layers)] == want


def test_qwen2_explicit_layer_types_win():
    cfg = {**QWEN2, "use_sliding_window": True, "sliding_window": 16,
           "layer_types": ["full_attention"] * 5 + ["sliding_attention"]}
    args = args_of(cfg)
    assert [args.window(i) for i in range(6)] == [None] * 5 + [16]
    with pytest.raises(ModelLoadError, match="layer_types has 2 entries for 6 layers"):
        args_of({**cfg, "layer_types": ["full_attention"] * 2})


def test_qwen3_window_only_with_use_sliding_window():
    assert args_of({**QWEN3, "sliding_window": 64}).sliding_window is None
    assert args_of({**QWEN3, "sliding_window": 64, "use_sliding_window": True}).sliding_window == 64


def test_num_local_experts_alias():
    """transformers 5 writes Qwen3-MoE's expert count as num_local_experts; hub configs
    say num_experts. Both parse."""
    written = tf.Qwen3MoeConfig(**{k: v for k, v in QWEN3.items() if k != "model_type"}).to_dict()
    assert written.get("num_local_experts") == 8
    written.pop("num_experts", None)
    assert args_of(written).experts_per_layer == 8
    assert args_of(QWEN3).experts_per_layer == 8


def test_legacy_rope_scaling_and_yarn_without_factor():
    args = args_of({**QWEN3, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert args.rope_scaling["rope_type"] == "linear" and args.rope_scaling["factor"] == 2.0
    # As in transformers: yarn without a factor scales max_position_embeddings / original.
    args = args_of({**QWEN3, "max_position_embeddings": 4096,
                    "rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 1024}})
    assert args.rope_scaling["factor"] == 4.0
    with pytest.raises(ModelLoadError, match="rope type 'dynamic' is not supported"):
        args_of({**QWEN3, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})


@pytest.mark.parametrize(
    "base,changes,message",
    [
        (QWEN2, dict(decoder_sparse_step=0), "decoder_sparse_step"),
        (QWEN3, dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (OLMOE, dict(num_experts_per_tok=0), "num_experts_per_tok"),
        (OLMOE, dict(clip_qkv=-1.0), "clip_qkv"),
        (QWEN2, dict(layer_types=["chunked_attention"] * 6), "chunked_attention"),
    ],
)
def test_bad_family_values(base, changes, message):
    with pytest.raises(ModelLoadError, match=message):
        args_of({**base, **changes})
