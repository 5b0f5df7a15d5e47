"""Quality and routing report of a model (by default the bundled tiny MoE), written as
Markdown (by default to docs/bundled-model.md)::

    python -m edgemoe_lab.model_report [--model DIR] [--heldout FILE] [--out FILE]

Everything is measured with edgemoe's own forward pass in float32:

- held-out perplexity (and bits per byte) over the held-out text, cut into windows of
  the model's context;
- greedy sample generations through `edgemoe.load(...).generate`;
- per-layer expert-usage entropy of the top-k selections on the held-out text;
- cross-layer path skew: for each pair of consecutive MoE layers (n-1, n), every token
  contributes k*k (expert at n-1, expert at n) paths; we report the share of these
  activations covered by the most frequent 20% of the E*E possible paths, next to what
  uniform routing, layer-independent routing with the same per-layer usage, and a
  randomly initialised model of the same shape give.

The functions are reusable: `perplexity` (from edgemoe.evaluate), `RoutingCounts`, `usage_entropy`,
`path_coverage`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from edgemoe.evaluate import perplexity, windows  # noqa: F401  (shared with `edgemoe eval`; re-exported)
from edgemoe.models.base import Transformer
from edgemoe.runtime.trace import RoutingRecorder

# ----------------------------------------------------------------------------- measurement


class RoutingCounts(RoutingRecorder):
    """Counts top-k expert selections per layer, (layer n-1, layer n) expert paths and
    (layer, expert, input token) co-occurrences. `perplexity(..., recorder=)` calls
    `start` with each batch's tokens and `finish` after its forward."""

    def __init__(self, model: Transformer):
        super().__init__(model)
        self.E = self.num_experts
        self.V = model.args.vocab_size
        L = len(self.blocks)
        self.counts = torch.zeros(L, self.E, dtype=torch.float64)  # (L, E)
        self.pairs = torch.zeros(max(L - 1, 0), self.E, self.E, dtype=torch.float64)  # (L-1, E, E)
        self.token_counts = torch.zeros(L, self.E, self.V, dtype=torch.float64)  # (L, E, V)
        self._ids: dict[int, torch.Tensor] = {}  # MoE position -> (N, k) of this batch
        self._tokens: torch.Tensor | None = None

    def on_route(self, i: int, ids: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor) -> None:
        self._ids[i] = ids.detach().clone()  # (N, k)

    def start(self, tokens: torch.Tensor) -> None:
        """A batch of token windows (B, T) is about to run."""
        self._ids.clear()
        self._tokens = tokens.reshape(-1)  # (N,)

    def finish(self) -> None:
        """The batch ran: add its selections to the counts."""
        sel = [self._ids[i] for i in range(len(self.layers))]  # L x (N, k)
        E = self.E
        for i, s in enumerate(sel):
            flat = s.reshape(-1)
            tok = self._tokens.repeat_interleave(s.shape[1])  # (N*k,) token of each selection
            used = flat >= 0  # -1: a slot adaptive gating dropped
            flat, tok = flat[used], tok[used]
            self.counts[i] += torch.bincount(flat, minlength=E).double()
            self.token_counts[i].view(-1).index_add_(
                0, flat * self.V + tok, torch.ones(flat.numel(), dtype=torch.float64)
            )
        for i in range(1, len(sel)):
            a, b = sel[i - 1], sel[i]  # (N, k) x2
            paths = (a[:, :, None] * E + b[:, None, :]).reshape(-1)  # (N*k*k,)
            used = ((a[:, :, None] >= 0) & (b[:, None, :] >= 0)).reshape(-1)
            self.pairs[i - 1] += torch.bincount(paths[used], minlength=E * E).view(E, E).double()
        self._ids.clear()


def usage_entropy(counts: torch.Tensor) -> list[float]:
    """Entropy in bits of each layer's expert-usage distribution; counts (L, E)."""
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return (-(p * p.clamp_min(1e-300).log2()).sum(-1)).tolist()


def path_coverage(pairs: torch.Tensor, share: float = 0.2) -> float:
    """Share of activations covered by the most frequent `share` of the E*E paths;
    pairs (E, E) counts."""
    flat = pairs.flatten()
    top = max(1, math.ceil(share * flat.numel()))
    return (flat.sort(descending=True).values[:top].sum() / flat.sum().clamp_min(1e-300)).item()


def independent_pairs(counts_prev: torch.Tensor, counts_next: torch.Tensor) -> torch.Tensor:
    """Path counts expected if layer n's choice ignored layer n-1's (same per-layer usage)."""
    return torch.outer(counts_prev / counts_prev.sum(), counts_next / counts_next.sum())  # (E, E)


def mutual_information(pairs: torch.Tensor) -> float:
    """Mutual information in bits between the experts of two consecutive layers."""
    p = pairs / pairs.sum()
    outer = torch.outer(p.sum(1), p.sum(0))
    mask = p > 0
    return (p[mask] * (p[mask] / outer[mask]).log2()).sum().item()


def randomize_(model: Transformer, seed: int = 0, std: float = 0.02) -> None:
    """Replace every weight of a loaded model by a random initialisation of the same
    shape (normal(0, std) matrices, unit norms), experts included (with zero biases where
    the experts have biases)."""
    from edgemoe.experts import DenseExpert
    from edgemoe.models.moe import InRAMProvider

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.fill_(1.0)
    args = model.args
    H, I = args.hidden_size, args.expert_dim
    first = next(iter(next(model.moe_blocks()).provider.table.values()))
    biased = {n: getattr(first, n, None) is not None for n in ("b13", "b2")}
    experts = {}
    for layer in args.moe_layers():
        for e in range(args.experts_per_layer):
            w = [torch.randn(s, generator=gen) * std for s in ((I, H), (I, H), (H, I))]
            experts[(layer, e)] = DenseExpert(*w, args.expert_act, b13=torch.zeros(2 * I) if biased["b13"] else None,
                                              b2=torch.zeros(H) if biased["b2"] else None)
    provider = InRAMProvider(experts)
    for block in model.moe_blocks():
        block.provider = provider


def routing_summary(rec: RoutingCounts) -> dict:
    E = rec.E
    ent = usage_entropy(rec.counts)
    pair_stats = []
    for i in range(rec.pairs.shape[0]):
        pair_stats.append(
            {
                "layers": (rec.layers[i], rec.layers[i + 1]),
                "top20": path_coverage(rec.pairs[i]),
                "independent": path_coverage(independent_pairs(rec.counts[i], rec.counts[i + 1])),
                "mi_bits": mutual_information(rec.pairs[i]),
            }
        )
    all_pairs = rec.pairs.flatten()
    return {
        "layers": rec.layers,
        "entropy_bits": ent,
        "entropy_rel": [h / math.log2(E) for h in ent],
        "usage": (rec.counts / rec.counts.sum(-1, keepdim=True)).tolist(),
        "pairs": pair_stats,
        "top20_mean": sum(p["top20"] for p in pair_stats) / max(1, len(pair_stats)),
        "top20_all": path_coverage(all_pairs.view(1, -1)) if len(pair_stats) else float("nan"),
        "independent_mean": sum(p["independent"] for p in pair_stats) / max(1, len(pair_stats)),
    }


def expert_tokens(rec: RoutingCounts, layer_index: int, decode, top: int = 6, min_count: int = 20) -> list[list[str]]:
    """For each expert of one layer, the input tokens most over-represented among the
    tokens routed to it (lift = P(token | expert) / P(token))."""
    tc = rec.token_counts[layer_index]  # (E, V)
    overall = tc.sum(0)  # (V,)
    p_tok = overall / overall.sum()
    out = []
    for e in range(rec.E):
        p = tc[e] / tc[e].sum().clamp_min(1)
        lift = torch.where(tc[e] >= min_count, p / p_tok.clamp_min(1e-12), torch.zeros_like(p))
        ids = [int(i) for i in lift.argsort(descending=True)[:top] if lift[i] > 0]
        out.append([decode(i) for i in ids])
    return out


# ----------------------------------------------------------------------------- report

PROMPTS = [
    "def fibonacci(n):",
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):',
]
CHAT = "Write a Python function `is_even(n)`: Return True if n is even."
RANDOM_WINDOWS = 64  # the random-weights baseline needs no more text than this
SAMPLED = {"temperature": 0.7, "top_p": 0.95, "seed": 0}


def _fmt_token(s: str) -> str:
    s = s.replace("\n", "\\n").replace("\t", "\\t").replace("|", "\\|").replace("`", "'")
    return f"`{s}`" if s.strip() else f"`{s}`(space)"


def build_report(model_dir: Path, heldout: Path, max_tokens: int = 80) -> tuple[str, dict]:
    from edgemoe import load
    from edgemoe.checkpoint import load_hf
    from edgemoe.tokenizer import Tokenizer

    t0 = time.time()
    torch.manual_seed(0)
    model, ckpt = load_hf(model_dir, dtype="float32")
    args = model.args
    tok = Tokenizer(model_dir, eos_token_ids=args.eos_ids)
    text = heldout.read_text(encoding="utf-8")
    ids = tok.encode(text)  # "<|endoftext|>" separators become the EOS token
    context = args.max_position_embeddings
    rec = RoutingCounts(model)
    ppl = perplexity(model, ids, context, recorder=rec)
    rec.detach()
    n_eval = ppl["tokens"]
    eval_bytes = len(tok.decode(ids[1 : n_eval + 1], skip_special_tokens=False).encode("utf-8"))
    bpb = ppl["nll"] * n_eval / math.log(2) / eval_bytes
    trained = routing_summary(rec)
    mid = len(rec.layers) // 2
    specialists = {i: expert_tokens(rec, i, lambda t: tok.decode([t], skip_special_tokens=False)) for i in (0, mid)}

    randomize_(model, seed=0)
    rrec = RoutingCounts(model)
    rppl = perplexity(model, ids[: RANDOM_WINDOWS * context + 1], context, recorder=rrec)
    rrec.detach()
    rand = routing_summary(rrec)
    del model

    engine = load(model_dir, dtype="float32")
    samples = []
    for prompt in PROMPTS:
        r = engine.generate(prompt, max_tokens=max_tokens, temperature=0.0)
        samples.append(("completion", prompt, r.text, r.finish_reason))
    r = engine.chat([{"role": "user", "content": CHAT}], max_tokens=max_tokens, temperature=0.0)
    samples.append(("chat", CHAT, r.text, r.finish_reason))
    r = engine.generate(PROMPTS[0], max_tokens=max_tokens, **SAMPLED)
    samples.append(("sampled", PROMPTS[0], r.text, r.finish_reason))
    engine.close()

    info = _json(model_dir / "training.json")
    size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
    data = {
        "heldout_ppl": ppl["ppl"],
        "heldout_nll": ppl["nll"],
        "heldout_tokens": n_eval,
        "heldout_bits_per_byte": bpb,
        "random_ppl": rppl["ppl"],
        "routing": trained,
        "random_routing": rand,
        "model_bytes": size,
        "seconds": time.time() - t0,
    }
    md = _markdown(model_dir, heldout, args, info, data, samples, specialists, ckpt.config, max_tokens)
    return md, data


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _markdown(model_dir, heldout, args, info, d, samples, specialists, config, max_tokens) -> str:
    E, k = args.experts_per_layer, args.top_k
    tr, rr = d["routing"], d["random_routing"]
    n_paths = math.ceil(0.2 * E * E)
    L = []
    w = L.append
    w("# The bundled model: tiny-moe")
    w("")
    w("<!-- Generated by edgemoe_lab/model_report.py; do not edit by hand. -->")
    w("")
    w("Regenerate with:")
    w("")
    w("```")
    w(REPORT_COMMAND)
    w("```")
    w("")
    w(
        f"`edgemoe.assets.MODEL_DIR` is a Mixtral-architecture MoE with {args.num_hidden_layers} layers "
        f"of {E} experts (top-{k} routing), trained from scratch on the Python standard "
        "library's sources by `edgemoe train-tiny` (edgemoe_lab/train_tiny.py). It loads in "
        "transformers (`MixtralForCausalLM`) and in edgemoe with the same logits "
        "(tests/test_bundled_model.py)."
    )
    w("")
    w("## Shape")
    w("")
    params = info.get("parameters", {})
    w("| | |")
    w("|---|---|")
    w(f"| vocabulary | {args.vocab_size} (byte-level BPE, own tokenizer) |")
    w(f"| hidden size / layers | {args.hidden_size} / {args.num_hidden_layers} |")
    w(f"| attention | {args.num_attention_heads} heads, {args.num_key_value_heads} KV heads, head dim {args.head_dim} |")
    w(f"| experts | {E} per layer, top-{k}, expert intermediate size {args.expert_dim} |")
    w(f"| context | {args.max_position_embeddings} tokens |")
    w(f"| embeddings | {'tied' if args.tie_word_embeddings else 'untied'} |")
    if params:
        w(
            f"| parameters | {params['total'] / 1e6:.2f} M, of which experts {params['experts'] / 1e6:.2f} M "
            f"({params['experts'] / params['total']:.0%}) |"
        )
    w(f"| weights | {config.get('dtype', config.get('torch_dtype', '?'))}; model directory {d['model_bytes'] / 1e6:.2f} MB |")
    w("")
    if info:
        w("## Training")
        w("")
        c, t, r = info["corpus"], info["tokens"], info["recipe"]
        w(
            f"Command: `{info.get('command', 'edgemoe train-tiny')}` (Python {info['python']}, torch "
            f"{info['versions']['torch']}, transformers {info['versions']['transformers']}, "
            f"{info.get('threads', '?')} threads on {info.get('device', 'cpu')})."
        )
        w("")
        w(
            f"- Corpus: the stdlib's `.py` files without tests and generated tables, split by a hash of "
            f"the path: train {c['train']['files']} files ({c['train']['chars'] / 1e6:.2f} M chars), "
            f"calibration {c['calib']['files']} files, held-out {c['heldout']['files']} files. Train "
            f"tokens: {t['train_source']:,} from source files + {t['train_chat']:,} from "
            f"{info['chat_examples']} chat examples built from documented functions."
        )
        w(
            f"- Optimisation: {info['steps_done']} steps of {r['batch']} x {r['context']} tokens "
            f"({t['seen']:,} tokens, {t['epochs']} epochs), AdamW lr {r['lr']} (warm-up {r['warmup']}, cosine "
            f"to {r['min_lr_ratio']}x), weight decay {r['weight_decay']}, router load-balancing loss "
            f"coefficient {r['aux_loss_coef']}, seed {r['seed']}."
            + (" **Stopped early by --minutes.**" if info.get("stopped_early") else "")
        )
        s = info["seconds"]
        load = info.get("load_average", {})
        w(
            f"- Time: {s['total'] / 60:.1f} min in all (tokenizer {s['tokenizer']:.0f} s, training "
            f"{s['train'] / 60:.1f} min); load average at start/end "
            f"{_loads(load.get('start'))} / {_loads(load.get('end'))} on a {info.get('threads', 2)}-thread run "
            "(a load above the thread count means the cores were shared with other work)."
        )
        blocks = info.get("block_seconds", [])
        if blocks:
            fastest = min(blocks)
            w(
                f"- Speed: 100-step blocks took {fastest:.0f} to {max(blocks):.0f} s. At the fastest block's pace "
                f"the {info['steps_done']} steps take {fastest * info['steps_done'] / 100 / 60:.1f} min "
                "(an estimate of the time on an unshared machine)."
            )
        curve = info.get("loss_curve", [])
        if curve:
            w("- Training loss (mean per 100 steps): " + ", ".join(f"{x:.2f}" for x in curve) + ".")
        aux = info.get("aux_curve", [])
        if aux:
            w(
                "- Load-balancing loss, computed per layer (1.00 = even use; mean per 100 steps): "
                + ", ".join(f"{x:.3f}" for x in aux)
                + "."
            )
        w("")
    w("## Held-out quality")
    w("")
    w(
        f"On `{_rel(heldout)}` ({d['heldout_tokens']:,} predicted tokens, windows of "
        f"{args.max_position_embeddings}, float32 edgemoe forward):"
    )
    w("")
    w("| model | perplexity | bits per byte |")
    w("|---|---|---|")
    w(f"| tiny-moe | **{d['heldout_ppl']:.2f}** | {d['heldout_bits_per_byte']:.3f} |")
    w(f"| same shape, random weights (first {RANDOM_WINDOWS} windows) | {d['random_ppl']:.0f} | |")
    w("")
    w(
        "A uniform guess over the vocabulary would give a perplexity of "
        f"{args.vocab_size}. Bits per byte divide the total loss by the UTF-8 size of the "
        "predicted text, so they do not depend on the tokenizer."
    )
    w("")
    w("## Sample generations")
    w("")
    w(
        "Greedy (temperature 0) unless marked, float32, through `edgemoe.load(MODEL_DIR).generate` / `.chat`, "
        f"at most {max_tokens} tokens. Greedy decoding of a model this small tends to loop."
    )
    w("")
    for kind, prompt, text, reason in samples:
        if kind == "chat":
            w(f"Chat, user message: `{prompt}` (finish: {reason})")
            w("")
            w("```python")
            w(text)
            w("```")
        else:
            how = f", sampled with {', '.join(f'{k}={v}' for k, v in SAMPLED.items())}" if kind == "sampled" else ""
            w(f"Prompt `{prompt.splitlines()[0]}`{' ...' if chr(10) in prompt else ''} (finish: {reason}{how}):")
            w("")
            w("```python")
            w(prompt + text)
            w("```")
        w("")
    w("## Expert usage per layer")
    w("")
    w(
        f"Entropy of the distribution of top-{k} selections over the {E} experts, on the held-out text. "
        f"The maximum, log2({E}) = {math.log2(E):.0f} bits, means perfectly even use. 'Random weights' "
        f"columns here and below: the same model with every weight redrawn from N(0, 0.02^2), on the first "
        f"{RANDOM_WINDOWS} windows of the same text."
    )
    w("")
    w("| layer | entropy (bits) | relative | busiest expert | idlest expert | random weights (relative) |")
    w("|---|---|---|---|---|---|")
    for i, layer in enumerate(tr["layers"]):
        u = tr["usage"][i]
        w(
            f"| {layer} | {tr['entropy_bits'][i]:.3f} | {tr['entropy_rel'][i]:.1%} | "
            f"{max(u):.1%} | {min(u):.1%} | {rr['entropy_rel'][i]:.1%} |"
        )
    w("")
    w(
        f"Mean relative entropy: {sum(tr['entropy_rel']) / len(tr['entropy_rel']):.1%} "
        f"(random weights: {sum(rr['entropy_rel']) / len(rr['entropy_rel']):.1%})."
    )
    w("")
    w("## Cross-layer path skew")
    w("")
    w(
        f"For each pair of consecutive layers (n-1, n), every token contributes {k}x{k} = {k * k} "
        f"paths (expert at n-1, expert at n). Of the {E * E} possible paths, the most frequent 20% "
        f"({n_paths} paths) cover:"
    )
    w("")
    w(
        "| layers | tiny-moe | if its layers were independent | mutual information (bits) "
        "| random weights | if independent | mutual information (bits) |"
    )
    w("|---|---|---|---|---|---|---|")
    for p, q in zip(tr["pairs"], rr["pairs"]):
        a, b = p["layers"]
        w(
            f"| {a} -> {b} | {p['top20']:.1%} | {p['independent']:.1%} | {p['mi_bits']:.3f} "
            f"| {q['top20']:.1%} | {q['independent']:.1%} | {q['mi_bits']:.3f} |"
        )
    w(
        f"| **mean** | **{tr['top20_mean']:.1%}** | {tr['independent_mean']:.1%} | {_mean_mi(tr):.3f} "
        f"| {rr['top20_mean']:.1%} | {rr['independent_mean']:.1%} | {_mean_mi(rr):.3f} |"
    )
    w("")
    w(
        f"Counting paths of all layer pairs together (the top 20% of all {len(tr['pairs']) * E * E} "
        f"(layer pair, expert, expert) paths): {tr['top20_all']:.1%}. Uniform routing would give 20%."
    )
    w("")
    w(_skew_verdict(tr, rr, E, k))
    w("")
    w("## What experts specialise in")
    w("")
    w(
        "Input tokens most over-represented among those routed to each expert "
        "(lift over the token's overall frequency; tokens seen at least 20 times):"
    )
    w("")
    for layer, rows in specialists.items():
        w(f"Layer {layer}:")
        w("")
        w("| expert | tokens |")
        w("|---|---|")
        for e, toks in enumerate(rows):
            w(f"| {e} | {' '.join(_fmt_token(t) for t in toks) or '(no input token routed here 20 times)'} |")
        w("")
    w("## Reproducing")
    w("")
    w(
        "`edgemoe train-tiny --out edgemoe/assets/tiny-moe --texts edgemoe/assets` retrains the model "
        "and rewrites the calibration and held-out texts; the run is seeded, so on the same machine "
        "and software versions it gives the same weights. The corpus comes from the running "
        "interpreter, so another Python version gives a slightly different corpus (training.json "
        "records the file counts and a checksum of each part). Then rerun the command at the top."
    )
    w("")
    w(f"Report generated on {platform.machine()} with Python {platform.python_version()} and torch {torch.__version__}.")
    w("")
    return "\n".join(L)


def _mean_mi(summary: dict) -> float:
    return sum(p["mi_bits"] for p in summary["pairs"]) / len(summary["pairs"])


def _skew_verdict(tr: dict, rr: dict, E: int, k: int) -> str:
    """The comparison with the paper, worded from the measured numbers."""
    ours, indep, rand = tr["top20_mean"], tr["independent_mean"], rr["top20_mean"]
    lo, hi = min(p["top20"] for p in tr["pairs"]), max(p["top20"] for p in tr["pairs"])
    mi, rmi = _mean_mi(tr), _mean_mi(rr)
    parts = [
        "**What this shows.** The EdgeMoE paper reports that on real MoE models the top 20% of paths "
        f"cover more than 99% of activations. Ours covers {ours:.0%} on average ({lo:.0%} to {hi:.0%} "
        f"per layer pair): more than uniform routing (20%), but far from 99%."
    ]
    if ours > indep:
        parts.append(
            f"Uneven expert use alone would give {indep:.0%} (the 'independent' column); the remaining "
            f"{(ours - indep) * 100:.0f} points come from consecutive layers choosing their experts "
            f"together (mutual information {mi:.2f} bits on average), which is the structure that "
            "expert prediction and preloading exploit."
        )
    else:
        parts.append(
            f"Uneven expert use alone would give {indep:.0%} (the 'independent' column), so consecutive "
            "layers' choices are barely correlated beyond their per-layer usage."
        )
    if rand >= ours:
        parts.append(
            f"Random weights give {rand:.0%}, more than the trained model, so on its own this share is no "
            f"sign of learned routing: it rises with uneven per-layer use (random: {rr['independent_mean']:.0%} "
            f"from usage alone), which the per-layer load-balancing loss removes from the trained model. "
            f"The trained model's layers are more correlated than random ones ({mi:.2f} vs {rmi:.2f} bits)."
            if mi > rmi
            else f"Random weights give {rand:.0%}, more than the trained model, so on its own this share "
            "is no sign of learned routing."
        )
    else:
        parts.append(f"Random weights give {rand:.0%} (mutual information {rmi:.2f} bits).")
    parts.append(
        f"This model is small and briefly trained, its load-balancing loss pushes every layer towards even "
        f"use, and a layer pair has only {E * E} possible paths at top-{k}; it does not route as sharply "
        "as the large models in the paper, and policies tuned on it should not assume 99%."
    )
    return " ".join(parts)


def _loads(v) -> str:
    return "/".join(f"{x:.1f}" for x in v[:1]) if v else "?"


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


REPORT_COMMAND = "python -m edgemoe_lab.model_report"


def main(argv: list[str] | None = None) -> int:
    from edgemoe import assets

    global REPORT_COMMAND
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m edgemoe_lab.model_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=assets.MODEL_DIR, help="HF model directory (default: the bundled model)")
    p.add_argument("--heldout", type=Path, default=assets.HELDOUT_TEXT, help="evaluation text (default: the bundled held-out text)")
    p.add_argument("--out", type=Path, default=Path("docs/bundled-model.md"), help="Markdown file to write")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON here")
    p.add_argument("--max-tokens", type=int, default=80, help="tokens per sample generation")
    args = p.parse_args(argv)
    from edgemoe.cli.common import check_output_dir, check_output_path

    check_output_dir(args.out.parent, "--out")
    if args.out.is_dir():
        check_output_path(args.out, "--out")  # says it is a directory
    REPORT_COMMAND = shlex.join(["python", "-m", "edgemoe_lab.model_report", *argv])
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    md, data = build_report(args.model, args.heldout, args.max_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2, default=float) + "\n")
    r = data["routing"]
    print(
        f"wrote {args.out}: held-out perplexity {data['heldout_ppl']:.3f} ({data['heldout_bits_per_byte']:.3f} bits/byte), "
        f"mean relative entropy {sum(r['entropy_rel']) / len(r['entropy_rel']):.1%}, "
        f"top-20% path coverage {r['top20_mean']:.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
