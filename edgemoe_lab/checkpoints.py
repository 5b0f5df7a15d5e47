"""Random-weight checkpoints for benchmarks: the lab's one writer of them.

`write_random_mixtral` writes a random-weight Hugging Face Mixtral checkpoint (bf16, one
safetensors shard per layer, a real config.json, the bundled model's byte-level BPE
tokenizer) with a fixed seed. Router weights get a larger spread than the rest so that
routing depends on the token (a random router is otherwise close to uniform).
`edgemoe bench` and the experiments (offload_baselines, decode_vs_transformers,
concurrent_streams, verify_cost, onednn_paths) all write theirs with it; tests build
their own checkpoints with transformers' classes (tests/conftest.py).

The default shape is Mixtral's, scaled down: 8 layers of 8 experts (top-2), hidden 2048,
expert intermediate 5632, 16 query heads and 4 key/value heads of 128, vocabulary 4096:
2.31 B parameters, 96% of them in experts.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class MixtralSpec:
    """The shape and seed of a random Mixtral checkpoint (the vocabulary comes from the
    tokenizer unless `write_random_mixtral` is given one)."""

    layers: int = 8
    experts: int = 8
    top_k: int = 2
    hidden: int = 2048
    inter: int = 5632
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 128
    seed: int = 0

    @property
    def expert_params(self) -> int:
        return self.layers * self.experts * 3 * self.hidden * self.inter

    def params(self, vocab: int) -> int:
        attn = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        per_layer = attn + self.experts * self.hidden + 2 * self.hidden
        return self.expert_params + self.layers * per_layer + 2 * vocab * self.hidden + self.hidden

    def describe(self, vocab: int) -> str:
        return (f"random Mixtral-shaped, {self.params(vocab) / 1e9:.2f} B parameters "
                f"({100 * self.expert_params / self.params(vocab):.0f}% in experts): {self.layers} layers x "
                f"{self.experts} experts (top-{self.top_k}), hidden {self.hidden}, expert intermediate "
                f"{self.inter}, {self.heads} query / {self.kv_heads} key-value heads of {self.head_dim}, "
                f"vocabulary {vocab}, bf16, seed {self.seed}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def bundled_tokenizer_dir() -> Path:
    from edgemoe.assets import MODEL_DIR

    return Path(MODEL_DIR)


def _vocab_size(tok_dir: Path) -> int:
    t = json.loads((tok_dir / "tokenizer.json").read_text())
    ids = list(t["model"]["vocab"].values()) + [a["id"] for a in t.get("added_tokens", [])]
    return max(ids) + 1


def mixtral_config(spec: MixtralSpec, vocab: int, bos: int, eos: int) -> dict:
    """config.json as transformers' MixtralConfig writes it."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "dtype": "bfloat16",
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.inter,
        "max_position_embeddings": 4096,
        "num_attention_heads": spec.heads,
        "num_experts_per_tok": spec.top_k,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "num_local_experts": spec.experts,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab,
    }


# What bench_model.json says wrote the checkpoint; the checkpoints written before the lab
# moved out of the edgemoe package (same weights for the same spec) say LEGACY_GENERATOR.
GENERATOR = "edgemoe_lab.checkpoints.write_random_mixtral"
LEGACY_GENERATOR = "edgemoe.bench.model.write_random_mixtral"


def write_random_mixtral(path: Path, spec: MixtralSpec = MixtralSpec(), tokenizer_dir: Path | None = None,
                         progress=None, vocab_size: int | None = None) -> Path:
    """Write the checkpoint to `path` (atomically: a temporary sibling, then a rename).
    Does nothing if `path` already holds a checkpoint written with the same spec.

    tokenizer_dir: whose tokenizer files to copy (default: the bundled model's).
    vocab_size: rows of the embedding and the output head (default: the tokenizer's
    size; a larger one gives the model's shape without a tokenizer that large).
    progress: called with (shards written, shards) after each shard."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else bundled_tokenizer_dir()
    vocab = _vocab_size(tok_dir)
    stamp = {"generator": GENERATOR, "spec": asdict(spec)}
    if vocab_size is not None:
        if vocab_size < vocab:
            raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {vocab} tokens ({tok_dir})")
        vocab = stamp["vocab_size"] = vocab_size
    if (path / "config.json").exists() and (path / "bench_model.json").exists():
        written = json.loads((path / "bench_model.json").read_text())
        if written.get("generator") == LEGACY_GENERATOR:
            written["generator"] = GENERATOR
        if written == stamp:
            return path
        raise FileExistsError(f"{path}: holds a different benchmark model; remove it or choose another --work")
    tcfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    t = json.loads((tok_dir / "tokenizer.json").read_text())
    by_content = {a["content"]: a["id"] for a in t.get("added_tokens", [])}
    bos = by_content.get(tcfg.get("bos_token"), 0)
    eos = by_content.get(tcfg.get("eos_token"), 0)

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(mixtral_config(spec, vocab, bos, eos), indent=2))
    for name in TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, tmp / name)
    g = torch.Generator().manual_seed(spec.seed)
    H, I, E = spec.hidden, spec.inter, spec.experts
    q_dim, kv_dim = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    weight_map: dict[str, str] = {}
    n_shards = spec.layers + 1
    for i in range(n_shards):
        if i == spec.layers:
            tensors = {"model.embed_tokens.weight": rand(vocab, H, std=1.0), "lm_head.weight": rand(vocab, H),
                       "model.norm.weight": ones(H)}
        else:
            p = f"model.layers.{i}."
            tensors = {p + "input_layernorm.weight": ones(H), p + "post_attention_layernorm.weight": ones(H),
                       p + "self_attn.q_proj.weight": rand(q_dim, H), p + "self_attn.k_proj.weight": rand(kv_dim, H),
                       p + "self_attn.v_proj.weight": rand(kv_dim, H), p + "self_attn.o_proj.weight": rand(H, q_dim),
                       p + "block_sparse_moe.gate.weight": rand(E, H, std=0.5)}
            for e in range(E):
                q = p + f"block_sparse_moe.experts.{e}."
                tensors[q + "w1.weight"] = rand(I, H)
                tensors[q + "w3.weight"] = rand(I, H)
                tensors[q + "w2.weight"] = rand(H, I)
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})
        del tensors
        if progress:
            progress(i + 1, n_shards)
    total = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "bench_model.json").write_text(json.dumps(stamp))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path
