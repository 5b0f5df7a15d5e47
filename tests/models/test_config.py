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


# ----------------------------------------------------------------------------- value checks

MIXTRAL = dict(
    model_type="mixtral", vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
    rope_theta=1e6, sliding_window=None, head_dim=None, eos_token_id=2,
)
BASES = {"mixtral": MIXTRAL, "qwen2_moe": QWEN2, "qwen3_moe": QWEN3, "olmoe": OLMOE}


def refused(config: dict, *fragments: str, family: str | None = None) -> str:
    """The ModelLoadError message for `config`; it names the file and every fragment."""
    with pytest.raises(ModelLoadError) as info:
        get_family(family or config["model_type"]).ModelArgs.from_dict(config, "/m/config.json")
    msg = str(info.value)
    assert msg.startswith("/m/config.json: ") and "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


@pytest.mark.parametrize(
    "base,changes,fragments",
    [
        # wrong types
        (MIXTRAL, dict(num_local_experts="8"), ["num_local_experts must be an integer, got '8'"]),
        (MIXTRAL, dict(num_experts_per_tok="2"), ["num_experts_per_tok must be an integer, got '2'"]),
        (MIXTRAL, dict(num_experts_per_tok=2.5), ["num_experts_per_tok must be an integer, got 2.5"]),
        (MIXTRAL, dict(num_experts_per_tok=2.0), ["num_experts_per_tok must be an integer, got 2.0"]),
        (QWEN3, dict(head_dim="32"), ["head_dim must be an integer or null, got '32'"]),
        (OLMOE, dict(rms_norm_eps="abc"), ["rms_norm_eps must be a number, got 'abc'"]),
        (QWEN2, dict(rope_theta="abc"), ["rope_theta must be a number, got 'abc'"]),
        (QWEN3, dict(rope_parameters={"rope_theta": "1e6"}), ["rope_parameters.rope_theta must be a number"]),
        (MIXTRAL, dict(rope_parameters=[1, 2]), ["rope_parameters must be an object or null, got [1, 2]"]),
        (MIXTRAL, dict(rope_scaling="linear"), ["rope_scaling must be an object or null"]),
        (QWEN3, dict(rope_scaling={"rope_type": "linear", "factor": "x"}), ["rope_scaling.factor must be a number"]),
        (QWEN3, dict(rope_parameters={"rope_type": "yarn", "factor": "x"}), ["rope_parameters.factor must be a number"]),
        (QWEN3, dict(rope_parameters={"rope_type": ["yarn"]}), ["rope type ['yarn'] is not supported"]),
        (MIXTRAL, dict(sliding_window="x"), ["sliding_window must be an integer or null, got 'x'"]),
        (MIXTRAL, dict(eos_token_id={"id": 2}), ["eos_token_id must be an integer or a list of integers or null"]),
        (MIXTRAL, dict(eos_token_id=[2, "3"]), ["eos_token_id must be"]),
        (MIXTRAL, dict(vocab_size=True), ["vocab_size must be an integer, got True"]),  # bool is not an int
        (OLMOE, dict(tie_word_embeddings=1), ["tie_word_embeddings must be true or false, got 1"]),
        (QWEN2, dict(hidden_act=["silu"]), ["hidden_act must be a string"]),
        (QWEN2, dict(mlp_only_layers=[1, "2"]), ["mlp_only_layers must be a list of integers or null"]),
        (QWEN2, dict(layer_types="full_attention"), ["layer_types must be a list of strings or null"]),
        # out of range
        (MIXTRAL, dict(num_key_value_heads=0), ["num_key_value_heads must be positive, got 0"]),
        (MIXTRAL, dict(num_key_value_heads=-2), ["num_key_value_heads must be positive, got -2"]),
        (MIXTRAL, dict(num_key_value_heads=3), ["num_attention_heads (4) is not a multiple of num_key_value_heads (3)"]),
        (QWEN3, dict(head_dim=-16), ["head_dim must be positive, got -16"]),
        (QWEN3, dict(head_dim=15), ["head_dim must be a positive even number"]),
        (MIXTRAL, dict(hidden_size=2), ["head_dim must be a positive even number", "got 0"]),  # 2 // 4 heads
        (OLMOE, dict(rms_norm_eps=0), ["rms_norm_eps must be positive, got 0"]),
        (OLMOE, dict(rms_norm_eps=-1e-6), ["rms_norm_eps must be positive"]),
        (OLMOE, dict(rms_norm_eps=float("nan")), ["rms_norm_eps must be a finite number, got nan"]),
        (OLMOE, dict(rms_norm_eps=float("inf")), ["rms_norm_eps must be a finite number, got inf"]),
        (QWEN2, dict(rope_theta=0), ["rope_theta must be positive, got 0"]),
        (QWEN2, dict(rope_theta=-1e4), ["rope_theta must be positive"]),
        (QWEN2, dict(rope_theta=1.0), ["rope_theta must be greater than 1"]),
        (QWEN3, dict(rope_parameters={"rope_type": "linear", "factor": 0}), ["rope_parameters.factor must be positive"]),
        (QWEN3, dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                   "high_freq_factor": 1.0}), ["low_freq_factor < high_freq_factor"]),
        (QWEN3, dict(rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 0}),
         ["rope_scaling.original_max_position_embeddings must be positive"]),
        (MIXTRAL, dict(sliding_window=0), ["sliding_window must be positive, got 0"]),
        (MIXTRAL, dict(sliding_window=-1), ["sliding_window must be positive, got -1"]),
        (QWEN2, dict(use_sliding_window=True, sliding_window=0), ["sliding_window must be positive when use_sliding"]),
        (QWEN3, dict(use_sliding_window=True, sliding_window=0), ["sliding_window must be positive when use_sliding"]),
        (QWEN2, dict(sliding_window=-4), ["sliding_window must be non-negative, got -4"]),
        (MIXTRAL, dict(max_position_embeddings=0), ["max_position_embeddings must be positive"]),
        (MIXTRAL, dict(intermediate_size=-64), ["intermediate_size must be positive"]),
        (MIXTRAL, dict(eos_token_id=-1), ["eos_token_id must be non-negative, got -1"]),
        (QWEN2, dict(mlp_only_layers=[0, -1]), ["mlp_only_layers must be non-negative, got [0, -1]"]),
        (OLMOE, dict(clip_qkv=0.0), ["clip_qkv must be positive"]),
        # counts that would make the loader loop or allocate for ever
        (QWEN2, dict(num_hidden_layers=10**12), ["num_hidden_layers 1000000000000 is implausibly large"]),
        (MIXTRAL, dict(num_local_experts=10**9), ["num_local_experts 1000000000 is implausibly large"]),
    ],
)
def test_bad_values_name_the_file_and_field(base, changes, fragments):
    refused({**base, **changes}, *fragments)


def test_aliases_are_named_as_written():
    """qwen3_moe and olmoe read num_local_experts when num_experts is absent; an error
    names the key the file actually has."""
    for base in (QWEN3, OLMOE):
        cfg = {k: v for k, v in base.items() if k != "num_experts"}
        refused({**cfg, "num_local_experts": "8"}, "num_local_experts must be an integer, got '8'")


@pytest.mark.parametrize("family", sorted(BASES))
def test_every_field_is_type_checked(family):
    """One generic routine covers every config field of every family: a value of the
    wrong type is refused naming the field, whatever the field."""
    cls = get_family(family).ModelArgs
    for name in cls.__dataclass_fields__:
        if name in ("rope_theta", "rope_scaling"):  # rope: see the cases above
            continue
        refused({**BASES[family], name: {"wrong": "type"}}, f"{name} must be ", family=family)


def test_values_that_mean_absent_or_disabled_are_accepted():
    """0 where transformers writes it: no experts (every layer dense), no shared expert,
    and Qwen2-MoE's sliding_window 0 when use_sliding_window is false."""
    args = args_of({**QWEN2, "num_experts": 0, "num_experts_per_tok": 0, "shared_expert_intermediate_size": 0,
                    "sliding_window": 0, "use_sliding_window": False, "max_window_layers": 0, "bos_token_id": 0})
    assert args.moe_layers() == [] and all(args.window(i) is None for i in range(6))
    args = args_of({**MIXTRAL, "rms_norm_eps": 1, "rope_theta": 500000})  # ints for float fields
    assert isinstance(args.rms_norm_eps, float) and args.rms_norm_eps == 1.0 and isinstance(args.rope_theta, float)
    assert args_of({**MIXTRAL, "eos_token_id": [2, 0]}).eos_ids == [2, 0]
    assert args_of({**MIXTRAL, "eos_token_id": None}).eos_ids == []
    yarn = args_of({**QWEN3, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                 "mscale": 0, "beta_fast": 0, "truncate": False}})
    assert yarn.rope_scaling["factor"] == 4.0 and yarn.rope_theta == 1e6


def test_missing_required_keys_are_listed():
    cfg = {k: v for k, v in MIXTRAL.items() if k not in ("hidden_size", "vocab_size")}
    refused(cfg, "missing required key(s): vocab_size, hidden_size")
    refused({**MIXTRAL, "hidden_size": None}, "hidden_size must be an integer, got None")
