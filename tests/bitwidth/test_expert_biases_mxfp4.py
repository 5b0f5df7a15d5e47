"""Bitwidth adaptation of gpt-oss experts: biases kept in every format and counted in
the stored sizes, and a release's MXFP4 codes as the top format (profile -> plan ->
convert --plan -> eval, the store and the plan in RAM agreeing to the byte and the bit)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as tf

from edgemoe.bitwidth.apply import ExpertVariants, load_planned, planned_bytes
from edgemoe.bitwidth.plan import make_plan
from edgemoe.bitwidth.profile import run_profile
from edgemoe.checkpoint import load_hf
from edgemoe.evaluate import eval_tokens, perplexity
from edgemoe.store.convert import convert
from edgemoe.store.manifest import read_manifest
from edgemoe.tokenizer import Tokenizer

from bitwidth.helpers import write_calib
from models.families.test_gpt_oss import CONFIGS
from store.mxfp4_helpers import randomize_gpt_oss, write_mxfp4_checkpoint

CONTEXT = 32
TOKENS = 4 * CONTEXT


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir):
    """A float gpt-oss checkpoint with non-zero expert biases, and its MXFP4 release form."""
    d = tmp_path_factory.mktemp("gpt_oss")
    hf = tf.AutoModelForCausalLM.from_config(CONFIGS["gpt_oss-sliding-yarn"]()).eval()
    randomize_gpt_oss(hf, seed=4)
    hf.save_pretrained(d / "float")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, d / "float" / f.name)
    write_mxfp4_checkpoint(hf, d / "float", d / "mxfp4")
    return d / "float", d / "mxfp4", write_calib(d / "calib.txt")


def test_variants_keep_biases_and_codes(checkpoints):
    """Every format of a biased expert carries its biases (an int8 expert is close to the
    original, not off by the biases); MXFP4 originals are their own mxfp4 variant and
    their exact float form."""
    flt, mx, _ = checkpoints
    model, _ = load_hf(flt, "float32")
    v = ExpertVariants(model)
    assert v.bias_parts == ("b13", "b2") and not v.mxfp4
    x = torch.randn(5, model.args.hidden_size, generator=torch.Generator().manual_seed(0))
    ref = v.originals[(0, 1)](x)
    assert (v.expert((0, 1), "int8")(x) - ref).abs().max() < 0.05 * ref.abs().max()
    model, _ = load_hf(mx, "float32")
    v = ExpertVariants(model)
    assert v.mxfp4 and v.bias_parts == ("b13", "b2")
    assert v.expert((1, 2), "mxfp4") is v.originals[(1, 2)]
    torch.testing.assert_close(v.expert((1, 2), "fp32")(x), v.originals[(1, 2)](x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["float", "mxfp4"])
def test_profile_plan_convert_eval(checkpoints, kind, tmp_path):
    flt, mx, calib = checkpoints
    src = flt if kind == "float" else mx
    prof = run_profile(src, calib, formats=["int8", "int4"], calib_tokens=TOKENS, context=CONTEXT, validate=2)
    assert prof["top_format"] == ("fp32" if kind == "float" else "mxfp4")
    if kind == "float":  # fp32 gate/up/down of 64 x 32 fill six 4 KiB pages; the biases need a seventh
        assert prof["formats"]["fp32"]["bytes"] == 7 * 4096
    prof["path"] = str(tmp_path / "profile.json")
    plan = make_plan(prof, max_loss=0.05, max_evals=2, holdback=0.0)
    meta = plan["meta"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    out = tmp_path / "conv"
    convert(src, out, plan=str(path))
    manifest = read_manifest(out)
    lengths = {(e.layer, e.expert): e.length for e in manifest.experts}
    # The profile's sizes are the store's blobs, biases included, format by format.
    for (layer, expert), f in {(e.layer, e.expert): e.format for e in manifest.experts}.items():
        assert lengths[(layer, expert)] == prof["formats"][f]["bytes"]
    assert sum(lengths.values()) == meta["expert_bytes"]
    model, ckpt, formats = load_planned(src, path, "float32")
    assert planned_bytes(model, ckpt, formats) == meta["expert_bytes"]
    tok = Tokenizer(src, eos_token_ids=model.args.eos_ids)
    ids = eval_tokens(tok, calib.read_text(), CONTEXT, TOKENS)
    import edgemoe

    with edgemoe.load(out, dtype="float32") as engine:
        stored = perplexity(engine.model, ids, CONTEXT)
    assert stored["nll"] == pytest.approx(perplexity(model, ids, CONTEXT)["nll"], abs=1e-5)
