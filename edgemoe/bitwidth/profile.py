"""`edgemoe profile`: how often each expert is used, and how much calibration loss each
candidate storage format would cost it.

One pass over the calibration text (windows of the model's context) runs the model in
RAM with autograd, recording for every MoE layer, through its blocks' expert hook
(`MoEBlock.expert_hook`), what its routed experts computed on: their input x_t exactly as
the experts received it (Gemma 4 runs them on a norm of the block's input), the routing
(experts and gate weights w_t) and the gradient g_t of the summed calibration loss with
respect to the experts' combined output (before the block adds a shared expert or
scales anything). Storing expert e in format f changes that output, at every token
routed to e, by

    d_t = w_t * (E_f(x_t) - E(x_t))              (gate weights on the outputs)
    d_t = E_f(w_t * x_t) - E(w_t * x_t)          (routers that scale inputs: Llama 4)

where E_f is the expert built from its encoded form exactly as the runtime builds it.
A second-order Taylor expansion of the summed calibration NLL in these output changes,
with the empirical-Fisher approximation of the Hessian, splits the increase in mean NLL
(nats per token) into two terms:

    first_order(e, f) = (1 / N) * sum_t g_t . d_t
    sensitivity(e, f) = (1 / N) * sum_t 1/2 (g_t . d_t)^2

The *sensitivity* is the expected increase: it is never negative and does not depend on
the sign of this particular text's gradient. The first-order term is that sign: near a
trained minimum it averages out over text, but on a given calibration text it can make a
quantized expert look better than the original. It is recorded, and the full Taylor
estimate (their sum) tracks single-expert calibration measurements closely, but the
planner uses the sensitivity by default, because plans chosen with the first-order term
fit the calibration text and lose more on held-out text (docs/bitwidth.md).

Both are products of vectors the pass already has, so all experts and formats cost about
one extra expert call each per window: no model evaluation per expert.

Validation: on a seeded sample of experts, the same pass also measures the real thing,
the calibration NLL with only that expert stored in format f (re-running the layers from
the expert's layer on), and the profile records the rank (Spearman) and linear (Pearson)
correlations between each estimate and these measurements.

Loss units: sensitivities are increases in mean NLL; the relative perplexity increase
of a change dNLL is exp(dNLL) - 1 (edgemoe.evaluate.relative_loss).

Encoder-decoder models (Switch Transformers, NLLB-MoE) are profiled on the seq2seq loss
`edgemoe eval` and the planner measure: each calibration window split into a source
half and a target half, the NLL of the target tokens given the source. The gradient then
reaches both stacks' experts (the encoder's through cross-attention), and validation
reruns the whole model rather than the layers from the expert's on.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .._version import __version__
from ..errors import EdgeMoEError, InvalidArgument
from ..evaluate import eval_tokens, read_text, windows
from ..quant.formats import for_experts, get_format
from .apply import ExpertVariants, canonical, stored_bytes

PROFILE_FORMAT = "edgemoe-expert-profile"
PROFILE_VERSION = 1
DEFAULT_FORMATS = ("int8", "int4", "int4-asym", "int3", "int3-asym", "int2", "int2-asym")
DEFAULT_CALIB_TOKENS = 32768  # predicted tokens of calibration text used (128 windows of 256)
DEFAULT_VALIDATE = 12  # experts whose proxy is checked against a full measurement
PROXY = "fisher-taylor"


def default_top(config: dict, expert_format: str | None = None) -> str:
    """The format `edgemoe convert` stores experts in without a plan: MXFP4 codes as
    released (`expert_format` "mxfp4", gpt-oss), else the checkpoint's compute dtype
    (bf16 for half-precision checkpoints, fp32 for fp32 ones)."""
    from ..checkpoint import config_dtype
    from ..store.convert import FLOAT_FORMAT

    if expert_format == "mxfp4":
        return "mxfp4"
    return FLOAT_FORMAT[config_dtype(config)]


def parse_formats(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """A comma-separated list of format names -> canonical names (checked), in order."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if not names:
        raise InvalidArgument("give at least one format")
    out = []
    for n in names:
        c = canonical(n)
        if c not in out:
            out.append(c)
    return out


# ----------------------------------------------------------------------------- statistics


def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties getting their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    r = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def pearson(a: list[float], b: list[float]) -> float:
    n = len(a)
    if n < 2:
        return float("nan")
    ma, mb = sum(a) / n, sum(b) / n
    sab = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    saa = sum((x - ma) ** 2 for x in a)
    sbb = sum((y - mb) ** 2 for y in b)
    return sab / math.sqrt(saa * sbb) if saa > 0 and sbb > 0 else float("nan")


def spearman(a: list[float], b: list[float]) -> float:
    return pearson(ranks(a), ranks(b))


# ----------------------------------------------------------------------------- the pass


def _tail(model, h: torch.Tensor, start: int) -> torch.Tensor:
    """Logits from the residual stream entering decoder layer `start` (no KV cache),
    ending as the model's forward does (`Transformer.head`: norm, LM head, soft-cap, scale)."""
    for layer in model.layers[start:]:
        h = layer(h, None)
    return model.head(h)  # (B, T, V)


def _forward(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) predicting targets y (B, T): the model on windows x, or, for an
    encoder-decoder, on sources x with y shifted right after the decoder start as the
    decoder's input (teacher forcing, as transformers computes a loss from labels)."""
    if not getattr(model, "is_encoder_decoder", False):
        return model(x)
    start = torch.full_like(y[:, :1], model.args.decoder_start_token_id)  # (B, 1)
    return model(x, torch.cat([start, y[:, :-1]], dim=1))


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32 at least (float64 stays float64: exact checks run in it)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return F.cross_entropy(_wide(logits).flatten(0, 1), targets.flatten(), reduction="sum").item()


def _sample(keys: list[tuple[int, int]], layers: list[int], n: int, seed: int) -> list[tuple[int, int]]:
    """n experts spread over the layers (round robin), chosen at random within each."""
    rng = random.Random(seed)
    by_layer = {l: [k for k in keys if k[0] == l] for l in layers}
    for v in by_layer.values():
        rng.shuffle(v)
    out, i = [], 0
    while len(out) < min(n, len(keys)):
        l = layers[i % len(layers)]
        if by_layer[l]:
            out.append(by_layer[l].pop())
        i += 1
    return sorted(out)


def _agreement(pred: list[float], meas: list[float]) -> dict:
    """Rank and linear correlation of estimates with measurements, and the slope of
    measured on predicted (least squares through the origin)."""
    sxx = sum(p * p for p in pred)
    enough = len(pred) >= 3
    return {
        "spearman": spearman(pred, meas) if enough else None,
        "pearson": pearson(pred, meas) if enough else None,
        "slope": sum(p * m for p, m in zip(pred, meas)) / sxx if sxx > 0 else None,
    }


class _Capture:
    """For one batch of windows: what each MoE block's routed experts computed on (their
    input, routing and gradient-retaining combined output, from the blocks' expert hooks)
    and each decoder layer's input. Hooks already set keep running; `remove` restores
    them. While `active` is False nothing is recorded (the validation reruns)."""

    def __init__(self, model):
        self.blocks = list(model.moe_blocks())
        self.active = True
        self.expert_in: dict[int, torch.Tensor] = {}  # layer -> (N, H)
        self.routing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> weights, ids (N, k) x2
        self.expert_out: dict[int, torch.Tensor] = {}  # layer -> (N, H), retains its gradient
        self.layer_in: dict[int, torch.Tensor] = {}
        self._prev = [b.expert_hook for b in self.blocks]
        for b, prev in zip(self.blocks, self._prev):
            b.expert_hook = self._expert_hook(prev)
        # Decoder layers' inputs (validation reruns from them); an encoder-decoder is rerun whole.
        self.handles = [layer.register_forward_pre_hook(self._layer(i))
                        for i, layer in enumerate(getattr(model, "layers", ()))]
        # The weights do not require gradients: make the embeddings' output the leaf (an
        # encoder-decoder with untied tables has the decoder's own too).
        for table in (model.embed, getattr(model, "dec_embed", None)):
            if table is not None:
                self.handles.append(table.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True)))

    def _expert_hook(self, prev):
        def hook(layer, x, weights, ids, out):
            if self.active:
                self.expert_in[layer] = x.detach()
                self.routing[layer] = (weights.detach(), ids)
                if out.requires_grad:
                    out.retain_grad()
                self.expert_out[layer] = out
            if prev is not None:
                prev(layer, x, weights, ids, out)

        return hook

    def _layer(self, i):
        def hook(module, args):
            if self.active:
                self.layer_in[i] = args[0].detach()

        return hook

    def clear(self) -> None:
        self.expert_in.clear()
        self.routing.clear()
        self.expert_out.clear()
        self.layer_in.clear()

    def remove(self) -> None:
        for b, prev in zip(self.blocks, self._prev):
            b.expert_hook = prev
        for h in self.handles:
            h.remove()


def profile_model(
    model,
    tokenizer,
    calib_text: str,
    *,
    formats: list[str] = DEFAULT_FORMATS,
    top: str = "bf16",
    store_dtype: torch.dtype | None = None,
    calib_tokens: int | None = DEFAULT_CALIB_TOKENS,
    context: int | None = None,
    batch: int = 8,
    validate: int = DEFAULT_VALIDATE,
    validate_formats: list[str] | None = None,
    seed: int = 0,
    progress: bool = False,
    source: str = "calibration text",
) -> dict:
    """Profile every routed expert of `model` (loaded in RAM, in float32 for exact
    encodings) on `calib_text`. `store_dtype` is the compute dtype of the expert store the
    plan will be converted into (default: the experts'), which expert biases are stored
    in. Returns the profile as a JSON-ready dict (see docs/bitwidth.md for the schema)."""
    t_start = time.perf_counter()
    args = model.args
    top = canonical(top)
    formats = [f for f in parse_formats(formats) if f != top]
    all_formats = [top] + formats
    H, I = args.hidden_size, args.expert_dim
    variants = ExpertVariants(model)
    biases = variants.store_biases(store_dtype or variants.dtype)
    # Ungated experts (Switch, NLLB-MoE) take each format's one-matrix layout.
    sizes = {f: stored_bytes(f, H, I, biases, variants.gated) for f in all_formats}
    lowest = min(formats or [top], key=lambda f: (sizes[f], f))
    vformats = parse_formats(validate_formats) if validate_formats else [lowest]
    unknown = [f for f in vformats if f not in all_formats]
    if unknown:
        raise InvalidArgument(f"validation format {unknown[0]} is not among the profiled formats ({', '.join(all_formats)})")
    if batch < 1:
        raise InvalidArgument(f"--batch must be at least 1, got {batch}")
    if validate < 0:
        raise InvalidArgument(f"--validate must be >= 0, got {validate}")
    context = context or args.max_position_embeddings
    if context < 2:
        raise InvalidArgument(f"--context must be at least 2, got {context}")
    ids = eval_tokens(tokenizer, calib_text, context, calib_tokens, source)
    seq2seq = getattr(model, "is_encoder_decoder", False)
    if seq2seq:  # sources (W, S) and targets (W, T): each window split in half, as evaluate.perplexity does
        from ..seq2seq import text_pairs

        inputs, targets = text_pairs(ids, context)
    else:
        inputs, targets = windows(ids, context)
    N = targets.numel()

    keys = variants.keys
    layers = list(args.moe_layers())
    E = args.experts_per_layer
    acc = {k: {"tokens": 0, "gate": 0.0, "ref_sq": 0.0,
               **{f: {"first": 0.0, "second": 0.0, "err_sq": 0.0} for f in all_formats}} for k in keys}
    sample = _sample(keys, layers, validate, seed) if validate else []
    checks = [(k, f) for f in vformats for k in sample]
    measured = {c: 0.0 for c in checks}
    ref_total = 0.0
    provider = variants.attach({})  # originals, in a table we can swap single experts in
    cap = _Capture(model)
    on_input = {b.layer: b.router.scales_input for b in cap.blocks}
    out_scale = {b.layer: getattr(b, "out_scale", 1.0) for b in cap.blocks}  # NLLB-MoE scales expert outputs

    def rerun(k, x, y):
        """Logits of the batch as the expert table is now: from expert k's layer on (None:
        from the first layer), or the whole model for an encoder-decoder."""
        if seq2seq:
            return _forward(model, x, y)
        start = 0 if k is None else k[0]
        return _tail(model, cap.layer_in[start], start)

    bar = tqdm(total=N, unit="tok", desc="profiling", disable=not progress, leave=False, dynamic_ncols=True)
    t_pass = time.perf_counter()
    t_valid = 0.0
    try:
        for i in range(0, inputs.shape[0], batch):
            x, y = inputs[i : i + batch], targets[i : i + batch]  # (B, T) x2
            cap.clear()
            with torch.enable_grad():
                logits = _forward(model, x, y)  # (B, T, V)
                loss = F.cross_entropy(_wide(logits).flatten(0, 1), y.flatten(), reduction="sum")
                loss.backward()
            del logits, loss
            with torch.inference_mode():
                for l in layers:
                    xs = cap.expert_in[l]  # (n, H): what the experts were given
                    grad = cap.expert_out[l].grad
                    if grad is None:
                        raise EdgeMoEError(f"layer {l}: the calibration loss does not depend on its experts' output")
                    g = grad.detach()  # (n, H)
                    weights, sel = cap.routing[l]  # (n, k) x2, as the forward routed
                    for e in range(E):
                        hit = sel == e  # (n, k)
                        rows = hit.any(-1).nonzero().squeeze(-1)  # (m,)
                        if rows.numel() == 0:
                            continue
                        w = (weights * hit).sum(-1)[rows].unsqueeze(-1)  # (m, 1)
                        xe, ge = xs[rows], g[rows]  # (m, H) x2
                        # The block weights either the expert's input (then sums the outputs)
                        # or its output; the same product, so the reference is bit-exact.
                        xe, out_w = (xe * w, 1.0) if on_input[l] else (xe, w)
                        if out_scale[l] != 1.0:
                            out_w = out_w * out_scale[l]
                        ref = variants.originals[(l, e)](xe)  # (m, H)
                        a = acc[(l, e)]
                        a["tokens"] += rows.numel()
                        a["gate"] += float(w.sum())
                        a["ref_sq"] += float((ref * out_w).double().square().sum())
                        for f in all_formats:
                            ex = variants.expert((l, e), f)
                            if ex is variants.originals[(l, e)]:
                                continue  # the format holds the weights exactly: no change
                            d = ((ex(xe) - ref) * out_w).double()  # (m, H)
                            gd = (ge.double() * d).sum(-1)  # (m,)
                            af = a[f]
                            af["first"] += float(gd.sum())
                            af["second"] += float(gd.square().sum())
                            af["err_sq"] += float(d.square().sum())
                if checks:
                    t0 = time.perf_counter()
                    cap.active = False  # the reruns below must not overwrite the captured states
                    base = _nll_sum(rerun(None, x, y), y)
                    ref_total += base
                    for (k, f) in checks:
                        provider.table[k] = variants.expert(k, f)
                        try:
                            measured[(k, f)] += _nll_sum(rerun(k, x, y), y) - base
                        finally:
                            provider.table[k] = variants.originals[k]
                    cap.active = True
                    t_valid += time.perf_counter() - t0
            bar.update(y.numel())
    finally:
        bar.close()
        cap.remove()
        variants.restore()
    pass_s = time.perf_counter() - t_pass

    experts = []
    for (l, e) in keys:
        a = acc[(l, e)]
        sens = {f: 0.5 * a[f]["second"] / N for f in all_formats}
        experts.append({
            "layer": l,
            "expert": e,
            "tokens": a["tokens"],
            "frequency": a["tokens"] / (N if N else 1),
            "mean_gate": a["gate"] / a["tokens"] if a["tokens"] else 0.0,
            "sensitivity": sens,
            "first_order": {f: a[f]["first"] / N for f in all_formats},
            "output_error": {f: math.sqrt(a[f]["err_sq"] / a["ref_sq"]) if a["ref_sq"] > 0 else 0.0 for f in all_formats},
        })
    for k, owner in variants.shared().items():  # one blob in the store: planned as one unit
        experts[keys.index(k)]["shares"] = list(owner)
    by_key = {(x["layer"], x["expert"]): x for x in experts}
    validation = []
    for f in vformats:
        meas = [measured[(k, f)] / N for k in sample]
        pred = [by_key[k]["sensitivity"][f] for k in sample]
        taylor = [by_key[k]["sensitivity"][f] + by_key[k]["first_order"][f] for k in sample]
        validation.append({
            "format": f,
            "experts": [[k[0], k[1]] for k in sample],
            "measured": meas,
            "predicted": pred,
            **_agreement(pred, meas),
            "predicted_taylor": taylor,
            "taylor": _agreement(taylor, meas),
        })
    ref_nll = ref_total / N if checks else None
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "created_by": f"edgemoe {__version__}",
        "model_type": args.model_type,
        "shape": {"hidden_size": H, "expert_dim": I, "moe_layers": layers, "experts_per_layer": E,
                  "top_k": args.top_k},
        "calibration": {
            "tokens": N,
            # An encoder-decoder's N counts target tokens only: the text tokens its windows took.
            **({"text_tokens": int(inputs.numel() + targets.numel())} if seq2seq else {}),
            "context": context,
            "windows": int(inputs.shape[0]),
            "sha256": hashlib.sha256(calib_text.encode("utf-8")).hexdigest(),
            "dtype": str(variants.dtype).removeprefix("torch."),
            "reference_nll": ref_nll,
        },
        "top_format": top,
        "formats": {f: {"bytes": sizes[f],
                        "bits": round(for_experts(get_format(f), variants.gated).bits_per_weight(H, I), 4)}
                    for f in all_formats},
        "proxy": {
            "name": PROXY,
            "unit": "increase in mean calibration NLL (nats/token); relative perplexity increase = exp(x) - 1",
            "sensitivity": "(1/N) * sum_t 1/2 (g_t.d_t)^2",
            "first_order": "(1/N) * sum_t g_t.d_t",
            "where": "d_t = w_t (E_f(x_t) - E(x_t)), or E_f(w_t x_t) - E(w_t x_t) for routers that scale the "
                     "experts' inputs, over the tokens t routed to the expert (x_t the expert's input, w_t its gate "
                     "weight), g_t = d(summed calibration NLL)/d(the layer's combined routed-expert output at t), "
                     "N = calibration tokens",
        },
        "experts": experts,
        "validation": validation,
        "seconds": {"pass": round(pass_s - t_valid, 3), "validation": round(t_valid, 3),
                    "total": round(time.perf_counter() - t_start, 3)},
    }


# ----------------------------------------------------------------------------- the file


def write_profile(profile: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(profile, indent=1) + "\n")
    tmp.replace(path)


def read_profile(path: str | Path) -> dict:
    """Load and check a profile written by `edgemoe profile`."""
    path = Path(path)
    src = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeMoEError(f"{src}: profile not found (write one with 'edgemoe profile MODEL -o {path.name}')") from None
    except IsADirectoryError:
        raise EdgeMoEError(f"{src}: is a directory, expected a profile JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeMoEError(f"{src}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise EdgeMoEError(f"{src}: not an edgemoe expert profile (write one with 'edgemoe profile')")
    if data.get("version") != PROFILE_VERSION:
        raise EdgeMoEError(f"{src}: profile version {data.get('version')!r} is not supported (expected {PROFILE_VERSION})")
    try:
        shape = data["shape"]
        formats = data["formats"]
        top = data["top_format"]
        if top not in formats:
            raise ValueError(f"top format {top!r} has no entry in 'formats'")
        for name, info in formats.items():
            canonical(name)
            if not isinstance(info["bytes"], int) or info["bytes"] <= 0:
                raise ValueError(f"format {name}: bad byte count {info['bytes']!r}")
        seen = set()
        for x in data["experts"]:
            k = (int(x["layer"]), int(x["expert"]))
            if k in seen:
                raise ValueError(f"layer {k[0]} expert {k[1]} is listed twice")
            seen.add(k)
            for f in formats:
                for what in ("sensitivity", "first_order"):
                    v = x[what][f]
                    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                        raise ValueError(f"layer {k[0]} expert {k[1]}: {what} for {f} is {v!r}")
        by_key = {(int(x["layer"]), int(x["expert"])): x for x in data["experts"]}
        for x in data["experts"]:
            owner = x.get("shares")
            if owner is None:
                continue
            if not (isinstance(owner, list) and len(owner) == 2 and tuple(owner) in by_key
                    and "shares" not in by_key[tuple(owner)] and tuple(owner) != (x["layer"], x["expert"])):
                raise ValueError(f"layer {x['layer']} expert {x['expert']}: shares {owner!r} is not an expert "
                                 "with its own weights")
        want = {(l, e) for l in shape["moe_layers"] for e in range(shape["experts_per_layer"])}
        if seen != want:
            raise ValueError(f"experts do not match the model shape ({len(seen)} listed, {len(want)} expected)")
    except EdgeMoEError as e:
        raise EdgeMoEError(f"{src}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise EdgeMoEError(f"{src}: malformed profile ({type(e).__name__}: {e})") from None
    data["path"] = src
    return data


def load_for_profiling(model_dir: str | Path, dtype: str = "float32"):
    """A Hugging Face model in RAM for profiling or planning, and its tokenizer."""
    from ..store.manifest import is_converted
    from ..checkpoint import load_hf
    from ..tokenizer import Tokenizer

    path = Path(model_dir)
    if is_converted(path):
        raise EdgeMoEError(f"{path}: a converted model; profiling and planning need the Hugging Face directory "
                           "it was converted from (the original weights)")
    model, ckpt = load_hf(path, dtype)
    if not list(model.moe_blocks()):
        raise EdgeMoEError(f"{path}: the model has no routed experts to profile")
    tokenizer = Tokenizer(path, eos_token_ids=model.args.eos_ids)
    tokenizer.check_vocab(model.args.vocab_size, str(path / "config.json"))
    return model, ckpt, tokenizer


def run_profile(model_dir: str | Path, calib: str | Path | None = None, top: str | None = None, **kwargs) -> dict:
    """Load a Hugging Face model in float32 and profile it on a calibration text (the
    bundled one by default); the profile records both paths, for `edgemoe plan`. The top
    format defaults to what `edgemoe convert` stores without a plan."""
    from ..checkpoint import config_dtype

    text, calib_path = read_calibration(calib)
    model, ckpt, tok = load_for_profiling(model_dir)
    top = top or default_top(ckpt.config, ckpt.expert_format)
    profile = profile_model(model, tok, text, top=top, store_dtype=config_dtype(ckpt.config), source=calib_path,
                            **kwargs)
    profile["model"] = str(Path(model_dir).resolve())
    profile["calibration"]["text"] = calib_path
    return profile


def read_calibration(path: str | Path | None) -> tuple[str, str]:
    """The calibration text and where it came from (the bundled text by default)."""
    if path is None:
        from .. import assets

        path = assets.CALIB_TEXT
    return read_text(path, "calibration text"), str(Path(path).resolve())
