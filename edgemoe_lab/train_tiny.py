"""Train the bundled tiny MoE (`edgemoe/assets/tiny-moe`) from the Python standard library.

The recipe needs nothing but the running interpreter's own sources:

1. **Corpus.** Every `.py` file of `sysconfig.get_paths()["stdlib"]`, minus the test
   suite, `site-packages` and generated tables (`encodings/`, `pydoc_data/`). A hash
   of each file's relative path puts the whole file in exactly one part (train,
   calibration or held-out), so no text straddles parts and the split does not depend
   on which other files exist. The train part also yields small chat examples: "write
   function `f(args)`: <docstring summary>" answered with the function's source, so
   that the chat template means something to the model.
2. **Tokenizer.** A byte-level BPE trained with `tokenizers` on the train part, saved as
   a standard Hugging Face tokenizer (`tokenizer.json`, `tokenizer_config.json` with a
   chat template, `special_tokens_map.json`).
3. **Model.** transformers' own `MixtralForCausalLM` (so the saved directory is a plain
   HF Mixtral checkpoint), trained with AdamW on packed windows of documents separated
   by `<|endoftext|>`, plus a router load-balancing loss computed per layer (see
   `balance_loss`); saved in bfloat16.
4. **Texts.** Deterministic cuts of the calibration and held-out parts
   (`calib.txt`, `heldout.txt`, a few hundred KB each) for profiling and evaluation.

Everything is seeded; with `--steps` fixed the run is reproducible on one machine (two
runs give bit-identical weights). The defaults were chosen to take about 13 minutes of
training on two unshared cores.
`--minutes` is a safety cap: a run stopped by it is recorded as such in
`training.json`. Regenerate the shipped assets with::

    edgemoe train-tiny --out edgemoe/assets/tiny-moe --texts edgemoe/assets
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import platform
import random
import shlex
import sys
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from edgemoe.errors import EdgeMoEError

# ----------------------------------------------------------------------------- corpus

# Directories left out of the corpus: the test suite (huge, repetitive, and has files in
# legacy encodings), installed third-party packages, and machine-generated tables.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
SKIP_TOP = {"encodings", "pydoc_data"}

# Split by a hash of the relative path into 100 buckets.
TRAIN_BUCKETS = range(0, 86)
CALIB_BUCKETS = range(86, 93)
HELDOUT_BUCKETS = range(93, 100)

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# The first thing rendered is the document separator, so a chat starts in the same
# state as any training document. Assistant turns end with <|end|>, a stop token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass
class Document:
    path: str  # relative to the stdlib directory, POSIX separators
    text: str

    @property
    def bucket(self) -> int:
        return path_bucket(self.path)


def path_bucket(rel: str) -> int:
    return int(hashlib.sha256(rel.encode("utf-8")).hexdigest()[:8], 16) % 100


def part_of(rel: str) -> str:
    b = path_bucket(rel)
    return "train" if b in TRAIN_BUCKETS else "calib" if b in CALIB_BUCKETS else "heldout"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def collect_corpus(root: Path) -> tuple[dict[str, list[Document]], list[str]]:
    """Read the stdlib sources under `root`, split into parts. Returns the parts (each
    sorted by path) and the relative paths that were skipped as not UTF-8."""
    if not root.is_dir():
        raise EdgeMoEError(f"{root}: Python standard library directory not found")
    parts: dict[str, list[Document]] = {"train": [], "calib": [], "heldout": []}
    skipped = []
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or (len(rel.parts) > 1 and rel.parts[0] in SKIP_TOP):
            continue
        try:
            text = file.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            skipped.append(rel.as_posix())
            continue
        if text.strip():
            parts[part_of(rel.as_posix())].append(Document(rel.as_posix(), text))
    # Special-token strings in a source file would be encoded as special tokens.
    for docs in parts.values():
        docs[:] = [d for d in docs if not any(t in d.text for t in SPECIAL_TOKENS)]
    if not parts["train"] or not parts["heldout"] or not parts["calib"]:
        raise EdgeMoEError(f"{root}: too few Python sources to build a corpus")
    return parts, skipped


def chat_examples(docs: list[Document], max_chars: int = 1200, limit: int = 1000) -> list[list[dict]]:
    """Chat conversations built from top-level functions that have a docstring: the user
    asks for the function by signature and docstring summary, the assistant answers
    with its source."""
    found = []
    for doc in docs:
        try:
            with warnings.catch_warnings():  # old invalid escapes in string literals
                warnings.simplefilter("ignore", SyntaxWarning)
                tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            summary = (ast.get_docstring(node) or "").split("\n\n")[0].strip()
            source = ast.get_source_segment(doc.text, node)
            if not summary or not source or len(source) > max_chars:
                continue
            ask = f"Write a Python function `{node.name}({ast.unparse(node.args)})`: {summary}"
            key = hashlib.sha256(f"{doc.path}:{node.name}".encode()).hexdigest()
            found.append((key, [{"role": "user", "content": ask}, {"role": "assistant", "content": source}]))
    found.sort(key=lambda kv: kv[0])  # deterministic, unrelated to file order
    return [conv for _, conv in found[:limit]]


def render_chat(messages: list[dict], add_generation_prompt: bool = False, bos_token: str = "") -> str:
    import jinja2

    # The same environment settings as transformers' apply_chat_template.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token
    )


def eval_text(docs: list[Document], max_chars: int, per_doc_chars: int) -> tuple[str, list[str]]:
    """A deterministic cut of a part: documents in path-hash order, each at most
    `per_doc_chars` (cut at a line end), joined by the EOS token until `max_chars`.
    Returns the text and the paths used."""
    order = sorted(docs, key=lambda d: hashlib.sha256(d.path.encode()).hexdigest())
    pieces, used, total = [], [], 0
    for doc in order:
        text = _cut_lines(doc.text, min(per_doc_chars, max_chars - total))
        if not text:
            break
        pieces.append(text)
        used.append(doc.path)
        total += len(text) + len(EOS)
        if total >= max_chars:
            break
    return EOS.join(pieces), used


def _cut_lines(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, max(limit, 0))
    return text[: cut + 1] if cut > 0 else ""


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok, out: Path, context: int) -> None:
    """Write the three files transformers' AutoTokenizer and edgemoe read."""
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "clean_up_tokenization_spaces": False,
        "model_max_length": context,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({**special, "additional_special_tokens": SPECIAL_TOKENS[1:]}, indent=2) + "\n"
    )


# ----------------------------------------------------------------------------- model


@dataclass
class Recipe:
    """Every setting of a run (recorded in training.json). The defaults make the bundled
    model; vocabulary, batch and learning rate were picked by a small sweep at equal
    token budget."""

    seed: int = 1234
    vocab_size: int = 4096
    hidden_size: int = 128
    layers: int = 8
    heads: int = 4
    kv_heads: int = 2
    experts: int = 8
    top_k: int = 2
    expert_dim: int = 256
    context: int = 256
    batch: int = 8
    steps: int = 1200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 40
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01
    grad_clip: float = 1.0
    chat_examples: int = 1000
    calib_chars: int = 300_000
    heldout_chars: int = 300_000
    per_doc_chars: int = 40_000
    threads: int = 2


def mixtral_config(r: Recipe, bos: int, eos: list[int]):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=r.vocab_size,
        hidden_size=r.hidden_size,
        intermediate_size=r.expert_dim,
        num_hidden_layers=r.layers,
        num_attention_heads=r.heads,
        num_key_value_heads=r.kv_heads,
        head_dim=r.hidden_size // r.heads,
        num_local_experts=r.experts,
        num_experts_per_tok=r.top_k,
        max_position_embeddings=r.context,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        router_aux_loss_coef=r.aux_loss_coef,
        router_jitter_noise=0.0,
        output_router_logits=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=bos,
        initializer_range=0.02,
    )


def pack(token_lists: list[list[int]], eos: int, context: int) -> torch.Tensor:
    """Concatenate documents, each preceded by EOS, and cut into (N, context) windows
    (the tail that does not fill a window is dropped)."""
    stream = []
    for ids in token_lists:
        stream.append(eos)
        stream.extend(ids)
    n = len(stream) // context
    return torch.tensor(stream[: n * context], dtype=torch.long).view(n, context)  # (N, T)


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss computed for each layer and averaged:
    E * sum_e(share of top-k picks to e * mean router probability of e), 1.0 when even.

    transformers' own `load_balancing_loss_func` pools the counts of all layers before
    multiplying, so an expert that dies in one layer can be made up for by the same
    index in another; balancing each layer keeps every expert of every layer in use."""
    losses = []
    for logits in router_logits:  # L x (N, E)
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        E = probs.shape[-1]
        picks = torch.topk(probs, top_k, dim=-1).indices.flatten()  # (N*k,)
        share = torch.bincount(picks, minlength=E).float() / picks.numel()  # (E,), no gradient
        losses.append(E * (share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def lr_at(step: int, r: Recipe) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    progress = min(1.0, (step - r.warmup) / max(1, r.steps - r.warmup))
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    r: Recipe,
    out: Path,
    texts_dir: Path | None,
    minutes: float | None = None,
    command: str = "",
    device: str = "cpu",
    log=print,
    root: Path | None = None,
) -> dict:
    """Run the whole recipe on the sources under `root` (default: the running
    interpreter's stdlib); returns the record written to `out/training.json`."""
    threads = torch.get_num_threads()
    try:
        return _train(r, out, texts_dir, minutes, command, device, log, root)
    finally:
        torch.set_num_threads(threads)  # the recipe sets its own; leave the caller's as it was


def _train(r: Recipe, out: Path, texts_dir: Path | None, minutes, command: str, device: str, log, root) -> dict:
    try:
        import transformers
        from tqdm import tqdm
        from transformers import MixtralForCausalLM
    except ImportError as e:  # transformers is a test/extra dependency of edgemoe
        raise EdgeMoEError(f"train-tiny needs transformers ({e}); install it with: pip install 'edgemoe[test]'") from None
    import tokenizers

    t_start = time.time()
    load_start = _loadavg()
    deadline = t_start + minutes * 60 if minutes else math.inf
    random.seed(r.seed)
    torch.manual_seed(r.seed)
    torch.set_num_threads(r.threads)
    out.mkdir(parents=True, exist_ok=True)

    root = Path(root) if root is not None else stdlib_dir()
    parts, skipped = collect_corpus(root)
    train_docs = parts["train"]
    convs = chat_examples(train_docs, limit=r.chat_examples)
    chat_texts = [render_chat(c) for c in convs]
    log(
        f"corpus: {root} (Python {platform.python_version()}): "
        + ", ".join(f"{k} {len(v)} files / {sum(len(d.text) for d in v) / 1e6:.2f} MB" for k, v in parts.items())
        + f", {len(convs)} chat examples"
    )

    t0 = time.time()
    tok = train_tokenizer([d.text for d in train_docs] + chat_texts, r.vocab_size)
    save_tokenizer(tok, out, r.context)
    eos, end = tok.token_to_id(EOS), tok.token_to_id("<|end|>")
    tokenizer_s = time.time() - t0
    log(f"tokenizer: {tok.get_vocab_size()} tokens in {tokenizer_s:.1f}s")

    raw = [e.ids for e in tok.encode_batch([d.text for d in train_docs])]
    chats = [e.ids for e in tok.encode_batch(chat_texts)]
    docs = raw + chats
    order = list(range(len(docs)))
    random.Random(r.seed).shuffle(order)
    data = pack([docs[i] for i in order], eos, r.context)  # (N, T)
    n_tokens = {"train_source": sum(map(len, raw)), "train_chat": sum(map(len, chats)), "windows": data.shape[0]}
    log(f"data: {n_tokens['train_source']} source + {n_tokens['train_chat']} chat tokens, {data.shape[0]} windows of {r.context}")

    config = mixtral_config(r, eos, [eos, end])
    config.output_router_logits = True  # training only: needed for the aux loss
    model = MixtralForCausalLM(config).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    log(f"model: {n_params / 1e6:.2f}M parameters, {n_expert / n_params:.0%} in experts")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=r.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(r.seed)
    perm = torch.randperm(data.shape[0], generator=gen)
    cursor, epochs = 0, 0
    losses, auxes, block_s, stopped_early = [], [], [], False
    t_train = t_block = time.time()
    bar = tqdm(range(r.steps), desc="train-tiny", unit="step", dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        if time.time() > deadline:
            stopped_early = True
            break
        if cursor + r.batch > data.shape[0]:
            perm, cursor, epochs = torch.randperm(data.shape[0], generator=gen), 0, epochs + 1
        batch = data[perm[cursor : cursor + r.batch]].to(device)  # (B, T)
        cursor += r.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step, r)
        out_ = model(input_ids=batch, output_router_logits=True)
        logits = out_.logits  # (B, T, V)
        lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        aux = balance_loss(out_.router_logits, r.top_k)
        (lm_loss + r.aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm = lm_loss.item()
        losses.append(lm)
        auxes.append(aux.item())
        if (step + 1) % 100 == 0:
            block_s.append(round(time.time() - t_block, 1))
            t_block = time.time()
        tok_s = (step + 1) * r.batch * r.context / (time.time() - t_train)
        bar.set_postfix(loss=f"{lm:.3f}", aux=f"{auxes[-1]:.3f}", tok_s=f"{tok_s:.0f}")
    bar.close()
    steps_done = len(losses)
    train_s = time.time() - t_train

    model.config.output_router_logits = False
    model.to("cpu", torch.bfloat16).save_pretrained(out)
    for f in out.iterdir():  # safetensors writes 0600; package data must be world-readable
        if f.is_file():
            f.chmod(0o644)
    record = {
        "recipe": asdict(r),
        "command": command,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "stdlib": str(root),
        "corpus": {
            k: {
                "files": len(v),
                "chars": sum(len(d.text) for d in v),
                "sha256": hashlib.sha256("\0".join(f"{d.path}\0{d.text}" for d in v).encode()).hexdigest(),
            }
            for k, v in parts.items()
        },
        "skipped_not_utf8": skipped,
        "split": {"hash": "sha256(relative path)[:8] % 100", "train": "0-85", "calib": "86-92", "heldout": "93-99"},
        "chat_examples": len(convs),
        "tokens": {**n_tokens, "seen": steps_done * r.batch * r.context, "epochs": round(steps_done * r.batch / data.shape[0], 2)},
        "parameters": {"total": n_params, "experts": n_expert},
        "steps_done": steps_done,
        "stopped_early": stopped_early,
        "final_loss_mean_last_20": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
        # mean LM loss (without the aux term) of every block of 100 steps
        "loss_curve": _block_means(losses),
        # per-layer load-balancing loss (1.0 = every expert of every layer equally used)
        "balance_loss": "per-layer Switch loss (edgemoe_lab.train_tiny.balance_loss)",
        "aux_curve": _block_means(auxes),
        # wall-clock seconds of every block of 100 steps: shows when the machine was shared
        "block_seconds": block_s,
        "seconds": {"tokenizer": round(tokenizer_s, 1), "train": round(train_s, 1), "total": round(time.time() - t_start, 1)},
        "threads": torch.get_num_threads(),
        "device": device,
        "load_average": {"start": list(load_start), "end": list(_loadavg())},
    }
    if texts_dir is not None:
        texts_dir.mkdir(parents=True, exist_ok=True)
        for name, part, limit in (("calib.txt", "calib", r.calib_chars), ("heldout.txt", "heldout", r.heldout_chars)):
            text, used = eval_text(parts[part], limit, r.per_doc_chars)
            (texts_dir / name).write_text(text, encoding="utf-8")
            record[f"{part}_text"] = {"file": name, "chars": len(text), "documents": used}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(
        f"saved {out} in {record['seconds']['total'] / 60:.1f} min: {steps_done} steps, "
        f"loss {record['final_loss_mean_last_20']:.3f}" + (" (stopped by --minutes)" if stopped_early else "")
    )
    return record


def _block_means(values: list[float], block: int = 100) -> list[float]:
    return [round(sum(values[i : i + block]) / len(values[i : i + block]), 4) for i in range(0, len(values), block)]


def _loadavg() -> tuple[float, ...]:
    try:
        import os

        return tuple(round(x, 2) for x in os.getloadavg())
    except (OSError, AttributeError):
        return ()


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    defaults = Recipe()
    p = argparse.ArgumentParser(
        prog="edgemoe train-tiny",
        description="Train the bundled tiny MoE (Mixtral architecture) from the Python standard library's sources.",
    )
    p.add_argument("--out", type=Path, default=Path("tiny-moe"), help="model directory to write (default: tiny-moe)")
    p.add_argument(
        "--texts",
        type=Path,
        default=None,
        help="also write calib.txt and heldout.txt into this directory (default: the parent of --out)",
    )
    p.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default: {defaults.steps})")
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="stop training early once this many minutes have passed (default: no limit; a stopped run is "
        "marked in training.json and is not the reference model)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--batch", type=int, default=defaults.batch, help="windows per step")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch threads (default: 2)")
    p.add_argument("--device", default="cpu", help="torch device to train on (default: cpu; the shipped model is CPU-trained)")
    args = p.parse_args(argv)
    if args.steps <= 0 or (args.minutes is not None and args.minutes <= 0) or args.batch <= 0:
        p.error("--steps, --minutes and --batch must be positive")
    from edgemoe.cli.common import check_output_dir

    check_output_dir(args.out, "--out")
    recipe = Recipe(seed=args.seed, steps=args.steps, batch=args.batch, lr=args.lr, threads=args.threads)
    texts = args.texts if args.texts is not None else args.out.resolve().parent
    train(recipe, args.out, texts, args.minutes, device=args.device, command=shlex.join(["edgemoe", "train-tiny", *argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
