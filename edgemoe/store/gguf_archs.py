"""What each llama.cpp `general.architecture` means in edgemoe's terms: the family, the
config built from the metadata, and the tensor names.

A GGUF holds what llama.cpp's convert_hf_to_gguf.py wrote: the Hugging Face config cut
down to the keys llama.cpp's C++ reads (`{arch}.expert_count`, ...), with llama.cpp's
defaults and fixed values for what it does not store (Llama 4's chunk size, gpt-oss's
alternating windows, ...). So the config built here is what llama.cpp runs on the file;
where that differs from the source checkpoint's transformers config, the difference is
said next to the architecture's builder below (one exception: Phi-3.5-MoE keeps its own
SparseMixer routing, which llama.cpp approximates). Tensor names are llama.cpp's
(gguf.constants.TENSOR_NAMES) and map straight to edgemoe's own parameter names
(`_COMMON_RULES` plus each architecture's `rules`); routed experts are read by
gguf.py one expert at a time under the store's `experts.L.E.part` names. RoPE settings
are read by gguf_rope.py.

The file is one table of ~20 architectures (a builder of 10-40 lines each and its entry
in ARCHITECTURES), longer than the usual module so that every llama.cpp architecture's
mapping reads in one place next to the shared Meta / Ctx helpers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ModelLoadError

SOFTMAX, SIGMOID = 1, 2  # gguf.ExpertGatingFuncType
BLOCK = re.compile(r"^blk\.(\d+)\.")

# GGUF tensor name -> edgemoe parameter name, for every architecture (after its own rules).
_COMMON_RULES = [
    (r"token_embd\.weight", "embed.weight"),
    (r"output_norm\.(weight|bias)", r"norm.\1"),
    (r"output\.(weight|bias)", r"lm_head.\1"),
    (r"blk\.(\d+)\.attn_norm\.(weight|bias)", r"layers.\1.norm1.\2"),
    (r"blk\.(\d+)\.ffn_norm\.(weight|bias)", r"layers.\1.norm2.\2"),
    (r"blk\.(\d+)\.attn_([qkv])\.(weight|bias)", r"layers.\1.attn.\2.\3"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"layers.\1.attn.o.\2"),
    (r"blk\.(\d+)\.attn_([qk])_norm\.weight", r"layers.\1.attn.\2_norm.weight"),
    (r"blk\.(\d+)\.ffn_gate_inp\.(weight|bias)", r"layers.\1.mlp.router.\2"),
    (r"blk\.(\d+)\.exp_probs_b\.bias", r"layers.\1.mlp.router.e_score_correction_bias"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)_shexp\.(weight|bias)", r"layers.\1.mlp.shared.\2.\3"),
    (r"blk\.(\d+)\.ffn_gate_inp_shexp\.weight", r"layers.\1.mlp.shared_gate.weight"),
]
# llama.cpp names GLM-4.5's and gpt-oss's second pre-norm post_attention_norm (their
# transformers name is post_attention_layernorm): it is the norm before the MLP.
_POST_ATTENTION_IS_NORM2 = [(r"blk\.(\d+)\.post_attention_norm\.weight", r"layers.\1.norm2.weight")]
_MLA_RULES = [
    (r"blk\.(\d+)\.attn_q_a\.(weight|bias)", r"layers.\1.attn.q_a.\2"),
    (r"blk\.(\d+)\.attn_q_a_norm\.weight", r"layers.\1.attn.q_a_norm.weight"),
    (r"blk\.(\d+)\.attn_q_b\.weight", r"layers.\1.attn.q_b.weight"),
    (r"blk\.(\d+)\.attn_kv_a_mqa\.(weight|bias)", r"layers.\1.attn.kv_a.\2"),
    (r"blk\.(\d+)\.attn_kv_a_norm\.weight", r"layers.\1.attn.kv_a_norm.weight"),
    (r"blk\.(\d+)\.attn_kv_b\.weight", r"layers.\1.attn.kv_b.weight"),
]
STACKED_EXPERTS = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.(weight|bias)$")  # (E, out, in), (E, out)
LEGACY_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")  # old Mixtral files: one per expert


# ----------------------------------------------------------------------------- metadata access


class Meta:
    """Typed access to GGUF metadata with errors naming the file and the key."""

    def __init__(self, meta: dict, path: Path, arch: str):
        self.meta, self.path, self.arch = meta, path, arch

    def get(self, key: str, kind: type | tuple, default=None, arch: bool = True):
        full = f"{self.arch}.{key}" if arch else key
        if full not in self.meta:
            return default
        value = self.meta[full]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        wrong_bool = isinstance(value, bool) and bool not in kinds  # bool is an int subclass
        if wrong_bool or not isinstance(value, kinds):
            want = " or ".join(k.__name__ for k in kinds)
            raise ModelLoadError(f"{self.path}: metadata {full} should be {want}, got {str(value)[:60]!r}")
        return value

    def need(self, key: str, kind, arch: bool = True):
        value = self.get(key, kind, None, arch)
        if value is None:
            full = f"{self.arch}.{key}" if arch else key
            raise ModelLoadError(f"{self.path}: metadata {full} is missing")
        return value

    def one(self, key: str, kind=int, default=None):
        """A value some files store per layer (a list): all layers must agree."""
        value = self.get(key, (kind, list), default)
        if isinstance(value, list):
            if not value or any(v != value[0] for v in value):
                raise ModelLoadError(f"{self.path}: metadata {self.arch}.{key} differs between layers "
                                     f"({str(value)[:60]}); edgemoe's families need one value")
            return value[0]
        return value


@dataclass
class Ctx:
    """What an architecture's config builder sees: the metadata, the tensors (name ->
    numpy-order shape) and the values every builder needs."""

    path: Path
    arch: str
    m: Meta
    shapes: dict[str, tuple[int, ...]]
    n_layers: int = 0
    head_dim: int = 0
    kv_per_layer: list[int] | None = None  # attention.head_count_kv per layer (hybrids: 0 = no attention)
    experts: int = 0
    used: int = 0
    expert_dim: int = 0
    moe_layers: list[int] = field(default_factory=list)
    read: Callable[[str], np.ndarray] | None = None  # a small tensor's values (rope factors), by name

    def has(self, name: str) -> bool:
        return name in self.shapes

    def rows(self, name: str) -> int | None:
        """Output rows of a 2-D weight (numpy order (out, in)), None if absent."""
        s = self.shapes.get(name)
        return s[0] if s is not None else None

    def first(self, suffix: str) -> str | None:
        """The first layer's tensor `blk.N.<suffix>` that exists."""
        return next((f"blk.{i}.{suffix}" for i in range(self.n_layers) if self.has(f"blk.{i}.{suffix}")), None)

    def any_layer(self, suffix: str) -> bool:
        return self.first(suffix) is not None

    def dense_width(self) -> int | None:
        """Width of the dense (non-MoE) layers' MLP, from metadata or the tensors."""
        width = self.m.one("feed_forward_length")
        if width is None:
            name = self.first("ffn_gate.weight")
            width = self.rows(name) if name else None
        return width

    def shared_count(self) -> int:
        """Always-on shared experts as a multiple of the routed width (from the tensors,
        which llama.cpp sizes from the same value)."""
        name = self.first("ffn_gate_shexp.weight")
        if name is None:
            return 0
        rows = self.rows(name)
        if rows % self.expert_dim:
            raise self.fail(f"tensor {name} has {rows} rows, not a multiple of the expert width {self.expert_dim}")
        return rows // self.expert_dim

    def gating(self, default: int, allowed: tuple[int, ...]) -> int:
        """expert_gating_func (1 softmax, 2 sigmoid), checked against what the family runs."""
        g = self.m.get("expert_gating_func", int, default)
        if g not in allowed:
            names = {SOFTMAX: "softmax", SIGMOID: "sigmoid"}
            raise self.fail(f"metadata {self.arch}.expert_gating_func {g} ({names.get(g, 'unknown')}) is not "
                            f"supported for {self.arch} (supported: {', '.join(names[a] for a in allowed)})")
        return g

    def groups(self) -> tuple[int, int]:
        """(n_group, topk_group): DeepSeek-V3-style group routing, one group when absent."""
        return self.m.get("expert_group_count", int, 0) or 1, self.m.get("expert_group_used_count", int, 0) or 1

    def fail(self, msg: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {msg}")


@dataclass(frozen=True)
class Arch:
    """One GGUF architecture: the edgemoe family (by name, or decided from the metadata),
    a description for messages, the family's config keys from the metadata, extra
    tensor-name rules, tensors not loaded, and llama.cpp's q/k row permutation."""

    description: str
    config: Callable[[Ctx, dict], None]  # fills in model_type and the family's keys
    rules: tuple = ()
    ignore: tuple = ()  # regexes of tensors the family does not use
    permuted_qk: bool = False  # LlamaModel.permute applied to q/k (RoPE pairs interleaved)
    nextn: bool = False  # block_count counts multi-token-prediction layers, dropped
    kv_per_layer: bool = False  # attention.head_count_kv may be a per-layer list, 0 for non-attention layers
    flat: tuple = ()  # regexes of tensors the converter gave extra axes (Mamba-2's (H, 1) A and D) to drop


# ----------------------------------------------------------------------------- builders


def _require_moe(c: Ctx, layers: list[int], what: str) -> None:
    """The MoE layers the config implies must be the layers with a router in the file."""
    if sorted(layers) != c.moe_layers:
        raise c.fail(f"the {what} metadata makes layers {_ranges(layers)} MoE, but the routers "
                     f"(blk.N.ffn_gate_inp) are in layers {_ranges(c.moe_layers)}")


def _ranges(layers: list[int]) -> str:
    return ",".join(map(str, layers[:12])) + ("..." if len(layers) > 12 else "") if layers else "none"


def _norm(c: Ctx, default: bool) -> bool:
    return c.m.get("expert_weights_norm", bool, default)


def llama(c: Ctx, cfg: dict) -> None:
    """Mixtral: llama.cpp's `llama` architecture with experts (every layer MoE)."""
    _require_moe(c, list(range(c.n_layers)), "llama (Mixtral: every layer MoE)")
    if _norm(c, True) is False:
        raise c.fail(f"{c.arch}.expert_weights_norm false is not supported for llama (Mixtral renormalises)")
    cfg.update(model_type="mixtral", intermediate_size=c.expert_dim, num_local_experts=c.experts,
               num_experts_per_tok=c.used, **_present(sliding_window=c.m.get("attention.sliding_window", int)))


def qwen2moe(c: Ctx, cfg: dict) -> None:
    dense = [i for i in range(c.n_layers) if i not in c.moe_layers]
    shared = c.m.get("expert_shared_feed_forward_length", int)
    if shared is None:
        name = c.first("ffn_gate_shexp.weight")
        shared = c.rows(name) if name else 0
    cfg.update(model_type="qwen2_moe", moe_intermediate_size=c.expert_dim, shared_expert_intermediate_size=shared,
               num_experts=c.experts, num_experts_per_tok=c.used, norm_topk_prob=bool(_norm(c, False)),
               decoder_sparse_step=1, mlp_only_layers=dense, qkv_bias=c.has("blk.0.attn_q.bias"),
               use_sliding_window=False, **_present(intermediate_size=c.dense_width()))


def _present(**kw) -> dict:
    """The keys whose value is known (None: leave the family's default)."""
    return {k: v for k, v in kw.items() if v is not None}


def qwen3moe(c: Ctx, cfg: dict) -> None:
    dense = [i for i in range(c.n_layers) if i not in c.moe_layers]
    # llama.cpp always renormalises Qwen3-MoE's top-k weights (as its checkpoints say).
    cfg.update(model_type="qwen3_moe", moe_intermediate_size=c.expert_dim, num_experts=c.experts,
               num_experts_per_tok=c.used, norm_topk_prob=_norm(c, True), decoder_sparse_step=1,
               mlp_only_layers=dense, attention_bias=c.has("blk.0.attn_q.bias"), use_sliding_window=False,
               **_present(intermediate_size=c.dense_width()))


def olmoe(c: Ctx, cfg: dict) -> None:
    _require_moe(c, list(range(c.n_layers)), "olmoe (every layer MoE)")
    cfg.update(model_type="olmoe", intermediate_size=c.expert_dim, num_experts=c.experts, num_experts_per_tok=c.used,
               norm_topk_prob=bool(_norm(c, False)), attention_bias=c.has("blk.0.attn_q.bias"),
               **_present(clip_qkv=c.m.get("attention.clamp_kqv", float)))


def _partial_rope(c: Ctx) -> float:
    rope = c.m.get("rope.dimension_count", int, c.head_dim)
    if not 0 < rope <= c.head_dim:
        raise c.fail(f"metadata {c.arch}.rope.dimension_count {rope} is outside 1..head_dim {c.head_dim}")
    return rope / c.head_dim


def glm4moe(c: Ctx, cfg: dict) -> None:
    """GLM-4.5 / 4.6 / Air. llama.cpp's defaults where the converter wrote nothing:
    expert_weights_norm false, one expert group. The multi-token-prediction layer that
    block_count includes (nextn_predict_layers) is dropped."""
    c.gating(SIGMOID, (SIGMOID,))
    lead = c.m.get("leading_dense_block_count", int, 0)
    _require_moe(c, list(range(lead, c.n_layers)), f"leading_dense_block_count {lead}")
    n_group, topk_group = c.groups()
    cfg.update(model_type="glm4_moe", intermediate_size=c.dense_width() or c.expert_dim,
               moe_intermediate_size=c.expert_dim, n_routed_experts=c.experts, n_shared_experts=c.shared_count(),
               num_experts_per_tok=c.used, first_k_dense_replace=lead, norm_topk_prob=_norm(c, False),
               routed_scaling_factor=c.m.get("expert_weights_scale", float, 1.0), n_group=n_group,
               topk_group=topk_group, use_qk_norm=c.any_layer("attn_q_norm.weight"),
               attention_bias=c.has("blk.0.attn_q.bias"), partial_rotary_factor=_partial_rope(c))


def dots1(c: Ctx, cfg: dict) -> None:
    """dots.llm1. llama.cpp runs every layer with full attention (released models slide in
    no layer either) and RoPE over the whole head."""
    c.gating(SIGMOID, (SIGMOID,))
    lead = c.m.get("leading_dense_block_count", int, 0)
    _require_moe(c, list(range(lead, c.n_layers)), f"leading_dense_block_count {lead}")
    if _partial_rope(c) != 1.0:
        raise c.fail(f"metadata {c.arch}.rope.dimension_count: partial RoPE is not supported for dots1")
    n_group, topk_group = c.groups()
    cfg.update(model_type="dots1", intermediate_size=c.dense_width() or c.expert_dim,
               moe_intermediate_size=c.expert_dim, n_routed_experts=c.experts, n_shared_experts=c.shared_count(),
               num_experts_per_tok=c.used, first_k_dense_replace=lead, norm_topk_prob=_norm(c, False),
               routed_scaling_factor=c.m.get("expert_weights_scale", float, 1.0), n_group=n_group,
               topk_group=topk_group, attention_bias=c.has("blk.0.attn_q.bias"), sliding_window=None,
               layer_types=["full_attention"] * c.n_layers)


# llama.cpp's fixed Llama 4 settings (llama-model.cpp, LLM_ARCH_LLAMA4): not in the file.
LLAMA4_CHUNK, LLAMA4_NOPE_EVERY, LLAMA4_FLOOR_SCALE, LLAMA4_ATTN_SCALE = 8192, 4, 8192.0, 0.1


def llama4(c: Ctx, cfg: dict) -> None:
    """Llama 4 (Scout, Maverick). llama.cpp fixes what the file does not store: chunked
    attention over 8192 positions in three layers of four, every fourth layer NoPE with
    attention temperature (floor 8192, scale 0.1), and L2 q/k norm except for the
    128-expert model (Maverick), as both released models have them."""
    if c.m.get("attention.sliding_window", int) == 0:
        raise c.fail(f"metadata {c.arch}.attention.sliding_window 0 (a Llama 4 without chunked attention) is not "
                     "supported")
    step = c.m.get("interleave_moe_layer_step", int, 1)
    if step < 1:
        raise c.fail(f"metadata {c.arch}.interleave_moe_layer_step {step} must be at least 1")
    _require_moe(c, list(range(step - 1, c.n_layers, step)), f"interleave_moe_layer_step {step}")
    cfg.update(model_type="llama4_text", intermediate_size=c.expert_dim,
               intermediate_size_mlp=c.dense_width() or c.expert_dim, num_local_experts=c.experts,
               num_experts_per_tok=c.used, interleave_moe_layer_step=step, attention_chunk_size=LLAMA4_CHUNK,
               no_rope_layer_interval=LLAMA4_NOPE_EVERY, attn_temperature_tuning=True, floor_scale=LLAMA4_FLOOR_SCALE,
               attn_scale=LLAMA4_ATTN_SCALE, use_qk_norm=c.experts != 128, attention_bias=c.has("blk.0.attn_q.bias"),
               head_dim=c.head_dim)


def deepseek2(c: Ctx, cfg: dict) -> None:
    """DeepSeek-V2 / V3 / R1, Kimi-K2, Moonlight: one GGUF architecture. Sigmoid gating
    (with the exp_probs_b correction bias) is V3's router, softmax V2's. Files from
    llama.cpp before mid-2025 store attn_kv_b with key_length = nope + rope; newer ones
    split it into attn_k_b / attn_v_b with key_length_mla (gguf.py joins them again).
    Without expert_group_count (older files) llama.cpp routes in one group."""
    sigmoid = c.gating(SOFTMAX, (SOFTMAX, SIGMOID)) == SIGMOID
    rope = c.m.need("rope.dimension_count", int)
    key, value = c.m.get("attention.key_length_mla", int), c.m.get("attention.value_length_mla", int)
    if key is None:
        key, value = c.m.need("attention.key_length", int), c.m.need("attention.value_length", int)
    if key <= rope:
        raise c.fail(f"metadata {c.arch}: key length {key} must exceed the RoPE dimensions {rope}")
    lead = c.m.get("leading_dense_block_count", int, 0)
    _require_moe(c, list(range(lead, c.n_layers)), f"leading_dense_block_count {lead}")
    n_group, topk_group = c.groups()
    heads = cfg["num_attention_heads"]
    cfg.pop("head_dim", None)
    cfg.update(
        model_type="deepseek_v3" if sigmoid else "deepseek_v2", num_key_value_heads=heads,
        intermediate_size=c.dense_width() or c.expert_dim, moe_intermediate_size=c.expert_dim,
        n_routed_experts=c.experts, n_shared_experts=c.shared_count(), num_experts_per_tok=c.used,
        routed_scaling_factor=c.m.get("expert_weights_scale", float, 1.0), norm_topk_prob=_norm(c, False),
        first_k_dense_replace=lead, n_group=n_group, topk_group=topk_group,
        q_lora_rank=c.m.get("attention.q_lora_rank", int), kv_lora_rank=c.m.need("attention.kv_lora_rank", int),
        qk_nope_head_dim=key - rope, qk_rope_head_dim=rope, v_head_dim=value,
        attention_bias=c.any_layer("attn_kv_a_mqa.bias"),
    )
    if sigmoid:
        cfg.update(rope_interleave=True, topk_method="noaux_tc", scoring_func="sigmoid")
    else:
        cfg.update(topk_method="group_limited_greedy" if n_group > 1 else "greedy")
    log_mul = c.m.get("rope.scaling.yarn_log_multiplier", float)
    rope_cfg = cfg["rope_parameters"]
    if log_mul is not None and rope_cfg.get("rope_type") == "yarn":
        # The converter writes 0.1 * mscale_all_dim; DeepSeek's configs have mscale equal to it.
        rope_cfg.update(mscale=log_mul / 0.1, mscale_all_dim=log_mul / 0.1)


def gpt_oss(c: Ctx, cfg: dict) -> None:
    """gpt-oss. llama.cpp fixes the sliding window to the even layers (as released) and
    the clamped SwiGLU; YaRN keeps the released model's un-truncated ramp (transformers'
    definition; llama.cpp rounds the ramp's ends, a difference of a few ulps in two
    frequencies)."""
    _require_moe(c, list(range(c.n_layers)), "gpt-oss (every layer MoE)")
    if cfg["rope_parameters"].get("rope_type") == "yarn":
        cfg["rope_parameters"]["truncate"] = False
    cfg.update(model_type="gpt_oss", intermediate_size=c.expert_dim, num_local_experts=c.experts,
               num_experts_per_tok=c.used, sliding_window=c.m.get("attention.sliding_window", int),
               layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(c.n_layers)],
               attention_bias=c.has("blk.0.attn_q.bias"), head_dim=c.head_dim)


def minimax_m2(c: Ctx, cfg: dict) -> None:
    """MiniMax-M2: sigmoid routing with the correction bias, always renormalised;
    full-width q/k norms; partial RoPE (rope.dimension_count channels of each head)."""
    c.gating(SIGMOID, (SIGMOID,))
    _require_moe(c, list(range(c.n_layers)), "minimax-m2 (every layer MoE)")
    cfg.update(model_type="minimax_m2", intermediate_size=c.expert_dim, num_local_experts=c.experts,
               num_experts_per_tok=c.used, head_dim=c.head_dim,
               rotary_dim=c.m.get("rope.dimension_count", int, c.head_dim))


def hunyuan_moe(c: Ctx, cfg: dict) -> None:
    """Hunyuan-A13B: one shared MLP as wide as the routed experts, q/k norms after RoPE.
    The converter bakes NTK-alpha into rope.freq_base (theta * alpha^(d/(d-2))), so the
    plain RoPE on that base is the same table."""
    _require_moe(c, list(range(c.n_layers)), "hunyuan-moe (every layer MoE)")
    shared = c.rows(c.first("ffn_gate_shexp.weight") or "")
    if shared != c.expert_dim:
        raise c.fail(f"a Hunyuan shared MLP of width {shared} next to experts of width {c.expert_dim} is not "
                     "supported (Hunyuan-A13B's are equal)")
    cfg.update(model_type="hunyuan_v1_moe", intermediate_size=c.expert_dim, num_experts=c.experts,
               moe_topk=c.used, norm_topk_prob=True, use_qk_norm=True, head_dim=c.head_dim,
               attention_bias=c.has("blk.0.attn_q.bias"))


def granitemoe(c: Ctx, cfg: dict) -> None:
    """Granite 3.x MoE (and its shared-MLP variant, the same GGUF architecture): the four
    multipliers are attention.scale, embedding_scale, residual_scale, logit_scale."""
    _require_moe(c, list(range(c.n_layers)), "granitemoe (every layer MoE)")
    shared = c.rows(c.first("ffn_gate_shexp.weight") or "") or 0
    cfg.update(model_type="granitemoeshared" if shared else "granitemoe", intermediate_size=c.expert_dim,
               num_local_experts=c.experts, num_experts_per_tok=c.used, attention_bias=c.has("blk.0.attn_q.bias"),
               embedding_multiplier=c.m.get("embedding_scale", float, 1.0),
               residual_multiplier=c.m.get("residual_scale", float, 1.0),
               attention_multiplier=c.m.get("attention.scale", float, c.head_dim ** -0.5),
               logits_scaling=c.m.get("logit_scale", float, 1.0), **({"shared_intermediate_size": shared} if shared else {}))


def ernie4_5_moe(c: Ctx, cfg: dict) -> None:
    """ERNIE-4.5-MoE: MoE layers from leading_dense_block_count on, every
    interleave_moe_layer_step-th; the last one is wherever the routers end (llama.cpp
    reads no end index: its files simply hold no router past it). use_bias shows as bias
    tensors."""
    c.gating(SOFTMAX, (SOFTMAX,))
    start, step = c.m.get("leading_dense_block_count", int, 0), c.m.get("interleave_moe_layer_step", int, 1)
    if step < 1:
        raise c.fail(f"metadata {c.arch}.interleave_moe_layer_step {step} must be at least 1")
    end = c.moe_layers[-1]
    _require_moe(c, [i for i in range(start, end + 1) if (i + 1) % step == 0],
                 f"leading_dense_block_count {start} and interleave_moe_layer_step {step}")
    cfg.update(model_type="ernie4_5_moe", intermediate_size=c.dense_width() or c.expert_dim,
               moe_intermediate_size=c.expert_dim, moe_num_experts=c.experts, moe_k=c.used,
               moe_num_shared_experts=c.shared_count(), moe_layer_start_index=start, moe_layer_end_index=end,
               moe_layer_interval=step, use_bias=c.has("blk.0.attn_q.bias"), head_dim=c.head_dim)


def dbrx(c: Ctx, cfg: dict) -> None:
    """DBRX: LayerNorms without bias (eps fixed at 1e-5 by the converter and by edgemoe's
    family), one fused qkv projection clamped to +-attention.clamp_kqv, softmax routing
    whose top-k weights llama.cpp always renormalises (moe_normalize_expert_weights 1;
    a checkpoint with another p-norm is run by llama.cpp, and so here, with p = 1)."""
    c.gating(SOFTMAX, (SOFTMAX,))
    _require_moe(c, list(range(c.n_layers)), "dbrx (every layer MoE)")
    eps = c.m.get("attention.layer_norm_epsilon", float, 1e-5)
    if abs(eps - 1e-5) > 1e-9:
        raise c.fail(f"metadata {c.arch}.attention.layer_norm_epsilon {eps} is not supported (DBRX's LayerNorms use "
                     "1e-5)")
    clip = c.m.get("attention.clamp_kqv", float)
    # DBRX's own spelling (the family reads its nested blocks, not transformers' top-level copies).
    for ours, theirs in (("hidden_size", "d_model"), ("num_attention_heads", "n_heads"),
                         ("num_hidden_layers", "n_layers"), ("max_position_embeddings", "max_seq_len")):
        cfg[theirs] = cfg.pop(ours)
    cfg.update(model_type="dbrx",
               attn_config={"kv_n_heads": cfg.pop("num_key_value_heads"), "clip_qkv": clip or None,
                            "rope_theta": cfg["rope_parameters"]["rope_theta"]},
               ffn_config={"ffn_hidden_size": c.expert_dim, "moe_num_experts": c.experts, "moe_top_k": c.used,
                           "moe_normalize_expert_weights": 1.0})


# Phi-3.5-MoE's SparseMixer threshold: llama.cpp routes Phi-MoE with a plain softmax over
# the top two and stores no jitter; edgemoe runs the model's own routing with the released value.
PHIMOE_JITTER = 0.01


def phimoe(c: Ctx, cfg: dict) -> None:
    """Phi-3.5-MoE: LayerNorms with bias (eps in layer_norm_rms_epsilon, as the converter
    writes it), biases on the attention and the LM head, SparseMixer routing (two experts,
    router_jitter_noise 0.01 as released: the file stores none, and llama.cpp approximates
    the routing by a softmax over the top two). LongRoPE from the rope_factors_short/long
    tensors with rope.scaling.attn_factor as the cos/sin scale at every length (llama.cpp
    switches to the long factors when its context exceeds the original one; transformers,
    and edgemoe, keep the short ones)."""
    _require_moe(c, list(range(c.n_layers)), "phimoe (every layer MoE)")
    window = c.m.get("attention.sliding_window", int) or None
    cfg.update(model_type="phimoe", intermediate_size=c.expert_dim, num_local_experts=c.experts,
               num_experts_per_tok=c.used, attention_bias=c.has("blk.0.attn_q.bias"), lm_head_bias=c.has("output.bias"),
               router_jitter_noise=PHIMOE_JITTER, sliding_window=window, head_dim=c.head_dim)
    short, long = c.has("rope_factors_short.weight"), c.has("rope_factors_long.weight")
    if short != long:
        raise c.fail("rope_factors_short.weight and rope_factors_long.weight must come together (LongRoPE)")
    if short:
        mscale = c.m.get("rope.scaling.attn_factor", float, 1.0)
        orig = c.m.get("rope.scaling.original_context_length", int, cfg["max_position_embeddings"])
        cfg["rope_parameters"] = {
            "rope_type": "longrope", "rope_theta": cfg["rope_parameters"]["rope_theta"],
            "short_factor": [float(x) for x in c.read("rope_factors_short.weight")],
            "long_factor": [float(x) for x in c.read("rope_factors_long.weight")],
            "short_mscale": mscale, "long_mscale": mscale, "original_max_position_embeddings": orig}


def _layer_types(sliding: list[bool]) -> list[str]:
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def exaone_moe(c: Ctx, cfg: dict) -> None:
    """EXAONE-MoE (K-EXAONE): DeepSeek-V3's sigmoid router with correction bias, shared
    experts, leading dense layers, q/k norms; attention.sliding_window_pattern says which
    layers slide, and only those use RoPE (llama.cpp and transformers alike). The
    multi-token-prediction layers block_count includes are dropped."""
    c.gating(SIGMOID, (SIGMOID,))
    lead = c.m.get("leading_dense_block_count", int, 0)
    _require_moe(c, list(range(lead, c.n_layers)), f"leading_dense_block_count {lead}")
    pattern = c.m.get("attention.sliding_window_pattern", (list, int))
    window = c.m.get("attention.sliding_window", int)
    if not isinstance(pattern, list) or len(pattern) < c.n_layers or window is None:
        raise c.fail(f"metadata {c.arch}.attention.sliding_window and a per-layer sliding_window_pattern are "
                     "needed (EXAONE-MoE rotates only its sliding layers)")
    n_group, topk_group = c.groups()
    cfg.update(model_type="exaone_moe", intermediate_size=c.dense_width() or c.expert_dim,
               moe_intermediate_size=c.expert_dim, num_experts=c.experts, num_experts_per_tok=c.used,
               num_shared_experts=c.shared_count(), norm_topk_prob=_norm(c, False),
               routed_scaling_factor=c.m.get("expert_weights_scale", float, 1.0), n_group=n_group,
               topk_group=topk_group, first_k_dense_replace=lead, sliding_window=window,
               layer_types=_layer_types([bool(p) for p in pattern[:c.n_layers]]), head_dim=c.head_dim)


# llama.cpp's fixed AFMoE settings (src/models/afmoe.cpp): not in the file.
AFMOE_GLOBAL_EVERY = 4  # every 4th layer global (NoPE), the others sliding with RoPE


def afmoe(c: Ctx, cfg: dict) -> None:
    """AFMoE (Trinity): llama.cpp fixes what the file does not store: MuP embedding
    scaling (sqrt(hidden)) and every fourth layer global without RoPE. Sigmoid routing
    with the expert bias, always renormalised, times expert_weights_scale; gated
    attention, q/k norms, norms before and after attention and MLP."""
    c.gating(SIGMOID, (SIGMOID,))
    if _norm(c, True) is False:
        raise c.fail(f"metadata {c.arch}.expert_weights_norm false is not supported (AFMoE renormalises)")
    lead = c.m.get("leading_dense_block_count", int, 0)
    _require_moe(c, list(range(lead, c.n_layers)), f"leading_dense_block_count {lead}")
    sliding = [(i + 1) % AFMOE_GLOBAL_EVERY != 0 for i in range(c.n_layers)]
    cfg.update(model_type="afmoe", intermediate_size=c.dense_width() or c.expert_dim,
               moe_intermediate_size=c.expert_dim, num_dense_layers=lead, num_experts=c.experts,
               num_experts_per_tok=c.used, num_shared_experts=c.shared_count(),
               route_scale=c.m.get("expert_weights_scale", float, 1.0), global_attn_every_n_layers=AFMOE_GLOBAL_EVERY,
               sliding_window=c.m.get("attention.sliding_window", int), layer_types=_layer_types(sliding),
               mup_enabled=True, attention_bias=c.has("blk.0.attn_q.bias"), head_dim=c.head_dim)


def lfm2moe(c: Ctx, cfg: dict) -> None:
    """LFM2-MoE: layers with 0 KV heads are gated short convolutions (shortconv.l_cache
    taps), the others attention with q/k norms; dense MLPs before leading_dense_block_count;
    sigmoid routing with the expert bias, renormalised, times expert_weights_scale. The
    final norm is token_embd_norm (LFM2's embedding_norm, applied after the last layer)."""
    c.gating(SIGMOID, (SIGMOID,))
    kv = c.kv_per_layer or [cfg["num_key_value_heads"]] * c.n_layers
    lead = c.m.get("leading_dense_block_count", int, 0)
    _require_moe(c, list(range(lead, c.n_layers)), f"leading_dense_block_count {lead}")
    cfg.update(model_type="lfm2_moe", layer_types=["full_attention" if k else "conv" for k in kv[:c.n_layers]],
               conv_L_cache=c.m.need("shortconv.l_cache", int), num_dense_layers=lead,
               intermediate_size=c.dense_width() or c.expert_dim, moe_intermediate_size=c.expert_dim,
               num_experts=c.experts, num_experts_per_tok=c.used, norm_topk_prob=_norm(c, True),
               routed_scaling_factor=c.m.get("expert_weights_scale", float, 1.0),
               use_expert_bias=c.any_layer("exp_probs_b.bias"), conv_bias=False, head_dim=c.head_dim)


def _period(c: Ctx, layers: list[int], what: str) -> tuple[int, int]:
    """(offset, period) with `layers` exactly the i >= offset with (i - offset) % period == 0."""
    if not layers:
        raise c.fail(f"no {what} layers in the file")
    offset = layers[0]
    period = layers[1] - layers[0] if len(layers) > 1 else max(c.n_layers, offset + 1)
    if period <= offset or layers != list(range(offset, c.n_layers, period)):
        raise c.fail(f"the {what} layers {_ranges(layers)} are not every n-th layer from an offset below n, as "
                     "Jamba's config describes them")
    return offset, period


def jamba(c: Ctx, cfg: dict) -> None:
    """Jamba: layers with 0 KV heads are Mamba-1 (ssm.* metadata; ssm_a holds -exp(A_log),
    read back as A_log), the others attention without position encoding; routed experts
    where the file has routers, dense MLPs of the same width elsewhere; softmax top-k
    without renormalisation."""
    c.gating(SOFTMAX, (SOFTMAX,))
    if _norm(c, False):
        raise c.fail(f"metadata {c.arch}.expert_weights_norm true is not supported (Jamba keeps the raw weights)")
    kv = c.kv_per_layer or [cfg["num_key_value_heads"]] * c.n_layers
    attn_offset, attn_period = _period(c, [i for i in range(c.n_layers) if kv[i]], "attention")
    moe_offset, moe_period = _period(c, c.moe_layers, "MoE")
    hidden, inner = cfg["hidden_size"], c.m.need("ssm.inner_size", int)
    if inner % hidden:
        raise c.fail(f"metadata {c.arch}.ssm.inner_size {inner} is not a multiple of embedding_length {hidden}")
    dense = c.dense_width()
    if dense not in (None, c.expert_dim):
        raise c.fail(f"dense MLPs of width {dense} next to experts of width {c.expert_dim} are not supported (Jamba's "
                     "are equal)")
    cfg.update(model_type="jamba", intermediate_size=c.expert_dim, num_experts=c.experts, num_experts_per_tok=c.used,
               expert_layer_offset=moe_offset, expert_layer_period=moe_period, attn_layer_offset=attn_offset,
               attn_layer_period=attn_period, mamba_d_state=c.m.need("ssm.state_size", int),
               mamba_d_conv=c.m.need("ssm.conv_kernel", int), mamba_expand=inner // hidden,
               mamba_dt_rank=c.m.need("ssm.time_step_rank", int), mamba_conv_bias=c.any_layer("ssm_conv1d.bias"),
               mamba_proj_bias=c.any_layer("ssm_in.bias"))


def granitehybrid(c: Ctx, cfg: dict) -> None:
    """Granite 4.0-H: layers with 0 KV heads are Mamba-2 (ssm.* metadata: time_step_rank
    is the head count, group_count the B/C groups), the others attention; RoPE only when
    rope.scaling.finetuned says so (the converter's flag for Bamba-style models); routed
    experts plus a shared MLP in every layer, and Granite's four multipliers."""
    # The attention layers are those with attention tensors: a converter that did not
    # recognise transformers 5's layer_types names writes 0 KV heads for every layer.
    attn = [c.has(f"blk.{i}.attn_q.weight") for i in range(c.n_layers)]
    kv = c.kv_per_layer or [cfg["num_key_value_heads"]] * c.n_layers
    if any(k and not a for k, a in zip(kv, attn)):
        raise c.fail(f"metadata {c.arch}.attention.head_count_kv gives KV heads to layers without attention tensors")
    if not any(kv) and any(attn):
        cfg["num_key_value_heads"] = c.rows(c.first("attn_k.weight")) // c.head_dim
    hidden, inner = cfg["hidden_size"], c.m.need("ssm.inner_size", int)
    if inner % hidden:
        raise c.fail(f"metadata {c.arch}.ssm.inner_size {inner} is not a multiple of embedding_length {hidden}")
    shared = c.rows(c.first("ffn_gate_shexp.weight") or "") or 0
    cfg.pop("head_dim", None)  # Granite derives it
    cfg.update(model_type="granitemoehybrid",
               layer_types=["full_attention" if a else "linear_attention" for a in attn],
               position_embedding_type="rope" if c.m.get("rope.scaling.finetuned", bool, False) else "nope",
               mamba_n_heads=c.m.need("ssm.time_step_rank", int), mamba_n_groups=c.m.get("ssm.group_count", int, 1),
               mamba_d_state=c.m.need("ssm.state_size", int), mamba_d_conv=c.m.need("ssm.conv_kernel", int),
               mamba_expand=inner // hidden, mamba_conv_bias=c.any_layer("ssm_conv1d.bias"),
               mamba_proj_bias=c.any_layer("ssm_in.bias"), intermediate_size=c.expert_dim,
               num_local_experts=c.experts, num_experts_per_tok=c.used, shared_intermediate_size=shared,
               attention_bias=c.any_layer("attn_q.bias"),
               embedding_multiplier=c.m.get("embedding_scale", float, 1.0),
               residual_multiplier=c.m.get("residual_scale", float, 1.0),
               attention_multiplier=c.m.get("attention.scale", float, c.head_dim ** -0.5),
               logits_scaling=c.m.get("logit_scale", float, 1.0))


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("Mixtral (llama with experts)", llama, permuted_qk=True),
    "qwen2moe": Arch("Qwen2-MoE", qwen2moe),
    "qwen3moe": Arch("Qwen3-MoE", qwen3moe),
    "olmoe": Arch("OLMoE", olmoe),
    "glm4moe": Arch("GLM-4.5", glm4moe, rules=tuple(_POST_ATTENTION_IS_NORM2), nextn=True),
    "dots1": Arch("dots.llm1", dots1),
    "llama4": Arch("Llama 4", llama4, ignore=(r"rope_freqs\.weight",)),
    "deepseek2": Arch("DeepSeek-V2/V3", deepseek2, rules=tuple(_MLA_RULES),
                      ignore=(r"blk\.\d+\.attn_[kv]_b\.weight",)),  # joined into kv_b by gguf.py
    "gpt-oss": Arch("gpt-oss", gpt_oss, rules=(*_POST_ATTENTION_IS_NORM2,
                                              (r"blk\.(\d+)\.attn_sinks\.weight", r"layers.\1.attn.sinks"))),
    "minimax-m2": Arch("MiniMax-M2", minimax_m2),
    "hunyuan-moe": Arch("Hunyuan-A13B", hunyuan_moe),
    "granitemoe": Arch("Granite MoE", granitemoe, permuted_qk=True),
    "ernie4_5-moe": Arch("ERNIE-4.5-MoE", ernie4_5_moe),
    "dbrx": Arch("DBRX", dbrx, rules=((r"blk\.(\d+)\.attn_qkv\.weight", r"layers.\1.attn.qkv.weight"),
                                      (r"blk\.(\d+)\.attn_output_norm\.weight", r"layers.\1.norm2.weight"))),
    "phimoe": Arch("Phi-3.5-MoE", phimoe, ignore=(r"rope_factors_(short|long)\.weight",)),
    "exaone-moe": Arch("EXAONE-MoE", exaone_moe, nextn=True),
    "afmoe": Arch("AFMoE", afmoe, rules=(
        (r"blk\.(\d+)\.attn_gate\.weight", r"layers.\1.attn.gate.weight"),
        (r"blk\.(\d+)\.post_attention_norm\.weight", r"layers.\1.post_attn_norm.weight"),
        (r"blk\.(\d+)\.post_ffw_norm\.weight", r"layers.\1.post_mlp_norm.weight"))),
    "lfm2moe": Arch("LFM2-MoE", lfm2moe, kv_per_layer=True, rules=(
        (r"token_embd_norm\.weight", "norm.weight"),
        (r"blk\.(\d+)\.shortconv\.conv\.weight", r"layers.\1.attn.conv_weight"),
        (r"blk\.(\d+)\.shortconv\.(in_proj|out_proj)\.weight", r"layers.\1.attn.\2.weight"))),
    "jamba": Arch("Jamba", jamba, kv_per_layer=True, rules=(
        (r"blk\.(\d+)\.ssm_(in|x|out)\.(weight|bias)", r"layers.\1.attn.\2_proj.\3"),
        (r"blk\.(\d+)\.ssm_dt\.(weight|bias)", r"layers.\1.attn.dt_proj.\2"),
        (r"blk\.(\d+)\.ssm_conv1d\.(weight|bias)", r"layers.\1.attn.conv_\2"),
        (r"blk\.(\d+)\.ssm_a(?:\.weight)?", r"layers.\1.attn.A_log"),  # -exp(A_log): see gguf.py
        (r"blk\.(\d+)\.ssm_d(?:\.weight)?", r"layers.\1.attn.D"),
        (r"blk\.(\d+)\.ssm_(dt|b|c)_norm\.weight", r"layers.\1.attn.\2_norm.weight"))),
    "granitehybrid": Arch("Granite 4.0-H", granitehybrid, permuted_qk=True, kv_per_layer=True, rules=(
        (r"blk\.(\d+)\.ssm_(in|out)\.(weight|bias)", r"layers.\1.attn.\2_proj.\3"),
        (r"blk\.(\d+)\.ssm_conv1d\.(weight|bias)", r"layers.\1.attn.conv_\2"),
        (r"blk\.(\d+)\.ssm_dt\.bias", r"layers.\1.attn.dt_bias"),
        (r"blk\.(\d+)\.ssm_a(?:\.weight)?", r"layers.\1.attn.A_log"),  # -exp(A_log): see gguf.py
        (r"blk\.(\d+)\.ssm_d(?:\.weight)?", r"layers.\1.attn.D"),
        (r"blk\.(\d+)\.ssm_norm\.weight", r"layers.\1.attn.norm.weight")),
        flat=(r"blk\.\d+\.ssm_(a|d|norm)(\.weight)?",)),
}


# llama.cpp architectures of families edgemoe runs from Hugging Face checkpoints, whose
# GGUF layout is not mapped (yet): refused with a pointer to the checkpoint.
NOT_MAPPED = {
    "gemma4": "Gemma 4", "qwen3next": "Qwen3-Next", "qwen35moe": "Qwen3.5-MoE",
}


def canonical_name(arch: Arch, name: str) -> str | None:
    """edgemoe's parameter name for GGUF tensor `name`; None for tensors this
    architecture does not load; raises KeyError for a name it does not know."""
    for pattern in arch.ignore:
        if re.fullmatch(pattern, name):
            return None
    for pattern, repl in (*arch.rules, *_COMMON_RULES):
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(name)
