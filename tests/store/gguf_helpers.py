"""Writing tiny GGUF files from tiny transformers checkpoints, the way llama.cpp's
convert_hf_to_gguf.py and llama-quantize do, with the `gguf` package's writer, tensor
name map and quantizers. Only the inverse direction (reading) is edgemoe's code, so a
mistake in one is not mirrored in the other: names come from gguf.TensorNameMap, the
q/k permutation is llama.cpp's formula, metadata keys are the writer's own methods."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

ARCH = {"mixtral": "LLAMA", "qwen2_moe": "QWEN2MOE", "qwen3_moe": "QWEN3MOE", "olmoe": "OLMOE"}


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


def hf_tensors(model) -> dict[str, np.ndarray]:
    """The model's weights under the names llama.cpp's converter sees: fused experts of
    transformers 5 as the stacked gate/up/down (E, out, in) it writes."""
    out = {}
    for name, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if name.endswith("experts.gate_up_proj"):
            gate, up = np.split(a, 2, axis=1)
            base = name[: -len("gate_up_proj")]
            out[base + "gate_proj"], out[base + "up_proj"] = gate, up
        elif name.endswith("experts.down_proj"):
            out[name] = a
        elif not name.endswith("rotary_emb.inv_freq"):
            out[name] = a
    return out


def write_gguf(model, tok_dir: Path | None, out: Path, qtype: str = "F16", expert_qtype: str | None = None,
               split_max_tensors: int = 0, chat_template: str | None = None, legacy_experts: bool = False) -> list[Path]:
    """Write `model` (a transformers MoE) as GGUF. qtype applies to the 2-D/3-D weights
    (routers, norms and 1-D tensors stay F32 as llama-quantize leaves them), expert_qtype
    to the routed experts (default: qtype). Returns the written file(s)."""
    import gguf

    cfg = model.config
    family = cfg.model_type
    arch = gguf.MODEL_ARCH[ARCH[family]]
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    n_layers = cfg.num_hidden_layers
    tmap = gguf.get_tensor_name_map(arch, n_layers)
    w = gguf.GGUFWriter(out, arch_name, split_max_tensors=split_max_tensors)
    w.add_name(f"tiny {family}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_vocab_size(cfg.vocab_size)
    if family == "mixtral":
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_rope_dimension_count(head_dim)
        w.add_expert_count(cfg.num_local_experts)
    else:
        w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if family in ("qwen2_moe", "qwen3_moe"):
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if family == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if family == "qwen3_moe":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if family == "olmoe":
        w.add_feed_forward_length(cfg.intermediate_size)
        if getattr(cfg, "clip_qkv", None) is not None:
            w.add_clamp_kqv(cfg.clip_qkv)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    if tok_dir is not None:
        add_tokenizer(w, tok_dir, cfg.vocab_size, chat_template)

    deq: dict[str, np.ndarray] = {}  # what the GGUF holds, dequantized, in transformers' layout
    for name, a in hf_tensors(model).items():
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        is_expert = gname is not None and "_exps" in gname
        if a.ndim == 1 or (gname and "ffn_gate_inp" in gname):
            data, raw = a.astype(np.float32), None
        else:
            data, raw = _encode(a, (expert_qtype or qtype) if is_expert else qtype)
        deq[name] = gguf.quants.dequantize(data, raw) if raw is not None else data.astype(np.float32)
        if family == "mixtral" and name.endswith(("q_proj.weight", "k_proj.weight")):
            kv = cfg.num_key_value_heads if name.endswith("k_proj.weight") else cfg.num_attention_heads
            data = llama_cpp_permute(data, cfg.num_attention_heads, kv)  # rows: commutes with row-wise blocks
        assert gname is not None, name
        if not gname.endswith((".weight", ".bias")):
            gname += ".weight"  # fused experts carry no suffix in transformers 5
        if is_expert and legacy_experts:  # old Mixtral layout: one tensor per expert
            part = gname.split(".")[2].replace("_exps", "")
            for e in range(data.shape[0]):
                w.add_tensor(f"blk.{gname.split('.')[1]}.{part}.{e}.weight", np.ascontiguousarray(data[e]), raw_dtype=raw)
            continue
        w.add_tensor(gname, np.ascontiguousarray(data), raw_dtype=raw)
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
    sd = ref.state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            if name.endswith("experts.gate_up_proj"):
                base = name[: -len("gate_up_proj")]
                t.copy_(torch.from_numpy(np.concatenate([deq[base + "gate_proj"], deq[base + "up_proj"]], axis=1)))
            elif name in deq:
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
