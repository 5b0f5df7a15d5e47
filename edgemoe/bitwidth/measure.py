"""Measuring plans for `edgemoe plan`: the model with a plan's experts, evaluated on the
profile's calibration text (split into the part the --max-loss search fits on and the
held-back windows that guard it) and, afterwards, on a held-out text."""

from __future__ import annotations

from ..errors import EdgeMoEError
from .apply import Key


def calibration_measurer(profile: dict, model_dir, calib, progress: bool, holdback: float):
    """A function plan -> measured relative calibration loss (with a held-back split:
    {"search": loss, "held_back": loss}), what it measures on, and a function measuring a
    plan on another text."""
    import hashlib

    from ..evaluate import eval_tokens, perplexity, relative_loss
    from .apply import ExpertVariants
    from .profile import load_for_profiling, read_calibration

    model_dir = model_dir or profile.get("model")
    if not model_dir:
        raise EdgeMoEError(f"{profile.get('path')}: the profile does not name its model; pass --model DIR")
    c = profile["calibration"]
    text, calib_path = read_calibration(calib or c.get("text"))
    if calib is None and c.get("sha256") and hashlib.sha256(text.encode("utf-8")).hexdigest() != c["sha256"]:
        raise EdgeMoEError(f"{calib_path}: the calibration text changed since the profile was made; "
                           "re-run 'edgemoe profile' or pass --calib")
    model, ckpt, tok = load_for_profiling(model_dir)
    shape = profile["shape"]
    args = model.args
    if (args.hidden_size, args.expert_dim, list(args.moe_layers()), args.experts_per_layer) != (
            shape["hidden_size"], shape["expert_dim"], shape["moe_layers"], shape["experts_per_layer"]):
        raise EdgeMoEError(f"{model_dir}: the model's shape does not match the profile {profile.get('path')}")
    context = c["context"]
    ids = eval_tokens(tok, text, context, c.get("text_tokens", c["tokens"]), calib_path)  # seq2seq: sources too
    variants = ExpertVariants(model)
    # Split whole windows: the search fits on the first part, the held-back part guards it.
    n_windows = (len(ids) - 1) // context
    back = int(round(holdback * n_windows)) if n_windows >= 2 else 0
    back = min(back, n_windows - 1)
    cut = (n_windows - back) * context
    parts = {"search": ids[: cut + 1]} if not back else {"search": ids[: cut + 1], "held_back": ids[cut:]}
    refs = {k: perplexity(model, v, context, progress=progress, desc=f"reference ({k})") for k, v in parts.items()}

    def measure(formats: dict[Key, str]):
        variants.attach(formats)
        try:
            losses = {k: relative_loss(perplexity(model, v, context, progress=progress,
                                                  desc="evaluating plan")["ppl"], refs[k]["ppl"])
                      for k, v in parts.items()}
        finally:
            variants.restore()
        return losses if back else losses["search"]

    def measure_text(formats: dict[Key, str], path) -> dict:
        """The plan's loss on another text (not used to choose it)."""
        other, other_path = read_calibration(path)
        oid = eval_tokens(tok, other, context, None, other_path)
        ref = perplexity(model, oid, context, progress=progress, desc="held-out reference")
        variants.attach(formats)
        try:
            got = perplexity(model, oid, context, progress=progress, desc="held-out plan")
        finally:
            variants.restore()
        return {"text": other_path, "tokens": ref["tokens"], "reference_ppl": ref["ppl"], "ppl": got["ppl"],
                "loss": relative_loss(got["ppl"], ref["ppl"])}

    info = {"text": calib_path, "tokens": sum(r["tokens"] for r in refs.values()), "context": context,
            "reference_ppl": refs["search"]["ppl"], "held_back_windows": back,
            "search_tokens": refs["search"]["tokens"]}
    return measure, info, measure_text
