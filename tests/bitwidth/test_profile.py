"""`edgemoe profile` internals: frequencies, sensitivities, the full-measurement check,
the statistics and the profile file."""

from __future__ import annotations

import json
import math

import pytest

from edgemoe.bitwidth.apply import ExpertVariants
from edgemoe.bitwidth.profile import (
    PROFILE_FORMAT,
    pearson,
    ranks,
    read_profile,
    run_profile,
    spearman,
    write_profile,
)
from edgemoe.errors import EdgeMoEError
from edgemoe.evaluate import eval_tokens, perplexity
from edgemoe.checkpoint import load_hf
from edgemoe.tokenizer import Tokenizer

from bitwidth.helpers import CONTEXT, make_hf, write_calib

FORMATS = ["int8", "int4", "int3", "int2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("profile")
    hf = make_hf(d / "hf", tokenizer_dir)
    calib = write_calib(d / "calib.txt")
    prof = run_profile(hf, calib, formats=FORMATS, context=CONTEXT, calib_tokens=8 * CONTEXT, batch=4, validate=4,
                       validate_formats=["int2", "int4"])
    return hf, calib, prof


def test_schema_and_frequencies(setup):
    hf, calib, p = setup
    assert p["format"] == PROFILE_FORMAT and p["version"] == 1
    assert p["model"] == str(hf.resolve()) and p["calibration"]["text"] == str(calib.resolve())
    assert p["top_format"] == "fp32"  # what convert stores an fp32 checkpoint's experts in
    assert list(p["formats"]) == ["fp32", *FORMATS]
    assert p["formats"]["int4"]["bits"] == 4.25 and p["formats"]["int4"]["bytes"] % 4096 == 0
    c = p["calibration"]
    assert c["tokens"] == 8 * CONTEXT and c["windows"] == 8 and c["context"] == CONTEXT
    assert len(p["experts"]) == 12
    for layer in (0, 1, 2):
        xs = [x for x in p["experts"] if x["layer"] == layer]
        # Every token picks top_k = 2 experts of every layer.
        assert sum(x["tokens"] for x in xs) == 2 * c["tokens"]
        assert math.isclose(sum(x["frequency"] for x in xs), 2.0)
    for x in p["experts"]:
        s = x["sensitivity"]
        assert s["fp32"] == 0.0 and x["output_error"]["fp32"] == 0.0
        assert all(v >= 0 for v in s.values())
        if x["tokens"]:
            # Fewer bits, larger output error (group-wise codes of the same weights).
            e = x["output_error"]
            assert e["int2"] > e["int3"] > e["int4"] > e["int8"] > 0
    total = {f: sum(x["sensitivity"][f] for x in p["experts"]) for f in FORMATS}
    assert total["int2"] > total["int3"] > total["int4"] > total["int8"]


def test_full_measurement_is_the_real_calibration_loss(setup):
    """The validation's measured loss increase equals a plain perplexity run of the model
    with only that expert quantized, on the same calibration tokens."""
    hf, calib, p = setup
    model, _ = load_hf(hf, "float32")
    tok = Tokenizer(hf, eos_token_ids=model.args.eos_ids)
    ids = eval_tokens(tok, calib.read_text(), CONTEXT, 8 * CONTEXT)
    ref = perplexity(model, ids, CONTEXT)
    assert ref["nll"] == pytest.approx(p["calibration"]["reference_nll"], abs=1e-6)
    v = ExpertVariants(model)
    for check in p["validation"]:
        assert check["format"] in ("int2", "int4") and len(check["experts"]) == 4
        assert {l for l, _ in check["experts"]} == {0, 1, 2}  # spread over the layers
        for (l, e), measured in list(zip(check["experts"], check["measured"]))[:2]:
            v.attach({(l, e): check["format"]})
            got = perplexity(model, ids, CONTEXT)["nll"] - ref["nll"]
            v.restore()
            assert got == pytest.approx(measured, abs=2e-6)
        assert -1 <= check["spearman"] <= 1 and -1 <= check["taylor"]["spearman"] <= 1
        # The second-order estimate is the Taylor one minus the first-order term.
        by = {(x["layer"], x["expert"]): x for x in p["experts"]}
        for (l, e), pr, ta in zip(check["experts"], check["predicted"], check["predicted_taylor"]):
            x = by[(l, e)]
            assert pr == x["sensitivity"][check["format"]]
            assert ta == pytest.approx(pr + x["first_order"][check["format"]])


def test_rank_statistics():
    assert ranks([10, 30, 20, 20]) == [1, 4, 2.5, 2.5]
    a = [0.1, 0.5, 0.2, 0.9, 0.3]
    assert spearman(a, [x**3 for x in a]) == pytest.approx(1.0)
    assert spearman(a, [-x for x in a]) == pytest.approx(-1.0)
    assert pearson(a, [2 * x + 1 for x in a]) == pytest.approx(1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_profile_file_round_trip_and_errors(setup, tmp_path):
    _, _, p = setup
    path = tmp_path / "p.json"
    write_profile(p, path)
    back = read_profile(path)
    assert back["experts"] == json.loads(json.dumps(p["experts"]))
    with pytest.raises(EdgeMoEError, match="profile not found"):
        read_profile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EdgeMoEError, match="not valid JSON"):
        read_profile(tmp_path / "bad.json")
    (tmp_path / "plan.json").write_text(json.dumps({"version": 1, "default": "int4"}))
    with pytest.raises(EdgeMoEError, match="not an edgemoe expert profile"):
        read_profile(tmp_path / "plan.json")
    cut = dict(p, experts=p["experts"][:-1])
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    with pytest.raises(EdgeMoEError, match="do not match the model shape"):
        read_profile(tmp_path / "cut.json")
    nan = json.loads(json.dumps(p))
    nan["experts"][3]["sensitivity"]["int2"] = "x"
    (tmp_path / "nan.json").write_text(json.dumps(nan))
    with pytest.raises(EdgeMoEError, match="layer 0 expert 3: sensitivity for int2"):
        read_profile(tmp_path / "nan.json")


def test_profile_refuses_converted_models_and_bad_options(setup, tmp_path):
    hf, calib, _ = setup
    from edgemoe.store.convert import convert

    conv = tmp_path / "conv"
    convert(hf, conv)
    with pytest.raises(EdgeMoEError, match="Hugging Face directory it was converted from"):
        run_profile(conv, calib)
    with pytest.raises(EdgeMoEError, match="unknown expert format 'int5'"):
        run_profile(hf, calib, formats=["int5"], context=CONTEXT)
    with pytest.raises(EdgeMoEError, match="fewer than one window"):
        run_profile(hf, calib, context=100_000, calib_tokens=None)
    with pytest.raises(EdgeMoEError, match="not among the profiled formats"):
        run_profile(hf, calib, formats=["int4"], validate_formats=["int2"], context=CONTEXT)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_other_families(family, tmp_path, tokenizer_dir):
    """Shared experts, dense layers and other routers: the pass and its checks hold."""
    from conftest import save_checkpoint, tiny_config

    hf = tmp_path / "hf"
    save_checkpoint(tiny_config(family), hf, tokenizer_dir)
    calib = write_calib(tmp_path / "calib.txt")
    p = run_profile(hf, calib, formats=["int4", "int2"], context=CONTEXT, calib_tokens=4 * CONTEXT, validate=2)
    E, k = p["shape"]["experts_per_layer"], p["shape"]["top_k"]
    assert len(p["experts"]) == len(p["shape"]["moe_layers"]) * E
    for layer in p["shape"]["moe_layers"]:
        assert sum(x["tokens"] for x in p["experts"] if x["layer"] == layer) == k * 4 * CONTEXT
    model, _ = load_hf(hf, "float32")
    ids = eval_tokens(Tokenizer(hf), calib.read_text(), CONTEXT, 4 * CONTEXT)
    ref = perplexity(model, ids, CONTEXT)["nll"]
    check = p["validation"][0]
    (l, e), measured = check["experts"][0], check["measured"][0]
    ExpertVariants(model).attach({(l, e): "int2"})
    assert perplexity(model, ids, CONTEXT)["nll"] - ref == pytest.approx(measured, abs=2e-6)
