"""The offline tools on encoder-decoder models (issue 14 §1): `edgemoe eval` gives a
seq2seq loss (source/target halves of each window) that equals seq2seq.score, in RAM,
converted under a budget and with a plan applied in RAM (= convert --plan); `edgemoe
trace` records both stacks, `fit-predictor` fits on that trace and generation preloads
with it; `edgemoe info` and the bitwidth tools size ungated experts at 2*H*I weights
(what the store holds), for Switch Transformers and NLLB-MoE (expert biases)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import CORPUS
from edgemoe import seq2seq
from edgemoe.checkpoint import load_hf
from edgemoe.cli import run as cli_run
from edgemoe.runtime.trace import RoutingTrace
from edgemoe.store.manifest import ExpertPlan, read_manifest

from models import seq2seq_parity as sp
from models.families import test_nllb_moe as nllb
from models.families import test_switch_transformers as switch

CONTEXT = 32  # windows of 16 source and 16 target tokens
TOKENS = 8 * CONTEXT

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli(*argv) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_run([str(a) for a in argv])
    assert code == 0, f"edgemoe {argv[0]} exited {code}: {err.getvalue()[-2000:]}"
    return out.getvalue(), err.getvalue()


def save(module, out, tokenizer_dir):
    sp.save(next(iter(module.SEQ2SEQ_CONFIGS.values()))(), out, gain=getattr(module, "GAIN", 1.0))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def switch_dirs(tmp_path_factory, tokenizer_dir):
    """A tiny Switch model, a plan mixing int8, int4 and fp32 experts, and its conversion
    with and without that plan."""
    d = tmp_path_factory.mktemp("switch")
    hf = save(switch, d / "hf", tokenizer_dir)
    model, _ = load_hf(hf)
    layers = model.args.moe_layers()
    plan = ExpertPlan("int8", layers={layers[-1]: "int4"}, experts={(layers[0], 1): "fp32"})
    (d / "plan.json").write_text(json.dumps(plan.to_dict()))
    cli("convert", hf, d / "conv", "--quiet")
    cli("convert", hf, d / "planned", "--plan", d / "plan.json", "--quiet")
    return hf, d / "conv", d / "planned", d / "plan.json", model


def min_budget(conv) -> int:
    return json.loads(cli("info", conv, "--json")[0])["memory"]["min_budget_bytes"]


def test_eval_seq2seq_loss(switch_dirs, text):
    """eval's loss is seq2seq.score's over the source/target halves of each window; the
    converted model under the smallest budget gives it too; a plan applied in RAM gives
    what the model converted with that plan gives, and the bytes its store holds."""
    hf, conv, planned, plan, model = switch_dirs
    common = ("--text", text, "--context", CONTEXT, "--max-tokens", TOKENS, "--json", "-q", "-t", 1, "--batch", 3)
    base = json.loads(cli("eval", hf, *common)[0])
    from edgemoe.tokenizer import Tokenizer

    ids = Tokenizer(hf, eos_token_ids=model.args.eos_ids).encode(text.read_text())[: TOKENS + 1]
    sources, targets = seq2seq.text_pairs(ids, CONTEXT)
    assert sources.shape == (TOKENS // CONTEXT, CONTEXT // 2) and targets.shape == sources.shape
    assert torch.equal(torch.cat([sources, targets], 1).flatten(), torch.tensor(ids[:TOKENS]))
    want = [seq2seq.score(model, s, t) for s, t in zip(sources.tolist(), targets.tolist())]
    assert base["loss"] == "seq2seq" and base["tokens"] == sum(n for _, n in want) == TOKENS // 2
    assert base["nll"] == pytest.approx(sum(nll for nll, _ in want) / base["tokens"], abs=1e-5)
    assert base["windows"] == TOKENS // CONTEXT and base["source_tokens"] == CONTEXT // 2

    stored = json.loads(cli("eval", conv, "--memory", min_budget(conv), *common)[0])
    assert stored["nll"] == pytest.approx(base["nll"], abs=1e-5) and stored["runtime"]["misses"] > 0

    in_ram = json.loads(cli("eval", hf, "--plan", plan, *common)[0])
    converted = json.loads(cli("eval", planned, *common)[0])
    assert in_ram["nll"] == pytest.approx(converted["nll"], abs=1e-5)
    assert in_ram["nll"] != base["nll"]  # int4 and int8 experts change the loss
    assert in_ram["expert_bytes"] == converted["expert_bytes"] == read_manifest(planned).expert_bytes
    layers, E = model.args.moe_layers(), model.args.experts_per_layer
    assert in_ram["formats"] == {"int8": (len(layers) - 1) * E - 1, "int4": E, "fp32": 1}


def test_trace_fit_and_preload(switch_dirs, text, tmp_path):
    """trace records every encoder and decoder MoE layer (the other stack's positions -1);
    simulate replays it; fit-predictor fits on it; generation preloads with the fitted predictor and gives the
    tokens it gives without preloading."""
    _, conv, _, _, model = switch_dirs
    conv2 = tmp_path / "conv"
    shutil.copytree(conv, conv2)  # predictor.npz is written next to the model
    trace = tmp_path / "t.npz"
    summary = json.loads(cli("trace", conv2, "--text", text, "-o", trace, "--window", CONTEXT, "--max-tokens", TOKENS,
                             "--lookahead", 1, "--batch", 3, "--json")[0])
    t = RoutingTrace.load(trace)
    split = t.header["encoder_moe_layers"]
    enc = sum(1 for layer in model.args.moe_layers() if layer < model.args.num_hidden_layers)
    assert split == enc and summary["moe_layers"] == len(model.args.moe_layers())
    # batches of 3, 3 and 2 pairs: an encoder forward over the sources, a decoder forward over the targets
    assert t.forward_tokens.tolist() == [n * CONTEXT // 2 for n in (3, 3, 3, 3, 2, 2)]
    enc_rows = np.repeat([True, False] * 3, t.forward_tokens)
    assert (t.ids[enc_rows][:, split:] == -1).all() and (t.ids[~enc_rows][:, :split] == -1).all()
    dec = t.ids[~enc_rows][:, split:]  # (T, L_dec, 1): routed, or -1 over an expert's capacity of 3
    kept = (dec >= 0).reshape(-1, CONTEXT // 2, dec.shape[1]).sum(1)  # (pairs, L_dec)
    assert (kept > 0).all() and (kept <= model.args.expert_capacity * model.args.experts_per_layer).all()
    assert (t.lookahead[enc_rows][:, split - 1] == 0).all()  # no look-ahead across the stacks
    assert seq2seq.trace_rows(t, "decoder", split).shape[0] == TOKENS // 2

    sim = json.loads(cli("simulate", trace, "--cache", 4, "--json")[0])  # the cache replay and the predictors
    assert sim["forwards"]["prefill"] == len(t.forward_tokens) and {"freq", "table", "gate"} <= set(sim["predictors"])
    report = json.loads(cli("fit-predictor", conv2, "--trace", trace, "--json")[0])
    assert {"freq@1", "table@1", "combined@1"} <= set(report["results"])
    assert 0 < report["results"]["table@1"]["recall"]["1"] <= 1
    budget = min_budget(conv2) + 2 * 24576
    gen = ("generate", conv2, "-p", "translate English to German: hello", "-n", 5, "--ignore-eos", "--json",
           "-t", 1, "--ctx-size", CONTEXT)
    pre = json.loads(cli(*gen, "--memory", budget, "--predictor", "combined")[0])
    plain = json.loads(cli(*gen, "--no-prefetch")[0])
    assert pre["stats"]["prefetch"] is True and pre["stats"]["predictor"] == "combined"
    assert pre["token_ids"] == plain["token_ids"]


@pytest.mark.parametrize("module", [switch, nllb], ids=["switch", "nllb"])
def test_info_sizes_ungated_experts(module, tmp_path, tokenizer_dir):
    """info counts 2*H*I weights per ungated expert, and its figures for the Hugging Face
    directory are what convert writes (NLLB's expert biases included); the bitwidth
    tools' sizes are the store's."""
    from edgemoe.bitwidth.apply import ExpertVariants, assignment

    hf = save(module, tmp_path / "hf", tokenizer_dir)
    info = json.loads(cli("info", hf, "--json")[0])
    model, _ = load_hf(hf)
    H, I = model.args.hidden_size, model.args.expert_dim
    assert info["params"]["per_expert"] == 2 * H * I
    n_experts = len(model.args.moe_layers()) * model.args.experts_per_layer
    assert info["params"]["experts"] == n_experts * 2 * H * I
    assert (info["layers"], info["decoder_layers"]) == (len(model.encoder), len(model.decoder))
    cli("convert", hf, tmp_path / "conv", "--quiet")
    conv = json.loads(cli("info", tmp_path / "conv", "--json")[0])
    for key in ("expert_cache_bytes", "min_cache_bytes", "params"):
        assert conv[key] == info[key], key
    assert conv["memory"]["min_budget_bytes"] == info["memory"]["min_budget_bytes"]

    plan = ExpertPlan("int4", layers={model.args.moe_layers()[0]: "int8"})
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_dict()))
    cli("convert", hf, tmp_path / "q", "--plan", tmp_path / "plan.json", "--quiet")
    formats = assignment(plan, model.args.moe_layers(), model.args.experts_per_layer)
    assert ExpertVariants(model).bytes(formats) == read_manifest(tmp_path / "q").expert_bytes


# ----------------------------------------------------------------------------- profile, plan, convert --plan

# Every encoder-decoder family (a test module with SEQ2SEQ_CONFIGS), by its first config.
FAMILIES = {mod.__name__.rsplit(".", 1)[1].removeprefix("test_"): mod for mod, _ in sp.all_configs().values()}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, tokenizer_dir):
    """(name, Hugging Face dir) of each encoder-decoder family's first tiny config."""
    mod = FAMILIES[request.param]
    return request.param, save(mod, tmp_path_factory.mktemp(request.param) / "hf", tokenizer_dir)


def test_profile_plan_convert_eval(family, text, tmp_path):
    """profile -> plan --max-loss -> convert --plan -> eval on the seq2seq loss: the
    profile's reference NLL is eval's, the plan's measured loss is what eval reports for
    the plan in RAM, the store holds the bytes the plan counted, and the converted model
    under a budget evaluates as the plan in RAM."""
    name, hf = family
    prof, plan, conv = tmp_path / "p.json", tmp_path / "plan.json", tmp_path / "conv"
    cli("profile", hf, "-o", prof, "--calib", text, "--context", CONTEXT, "--calib-tokens", TOKENS,
        "--formats", "int8,int4,int2", "--validate", 3, "--no-plot", "-q", "-t", 1)
    cli("plan", prof, "--max-loss", "5%", "-o", plan, "--max-evals", 2, "--holdback", 0, "--no-plot", "-q", "-t", 1)
    cli("convert", hf, conv, "--plan", plan, "--quiet")
    profile, meta = json.loads(prof.read_text()), json.loads(plan.read_text())["meta"]
    assert profile["calibration"]["tokens"] == TOKENS // 2  # the target halves
    assert meta["measured_loss"] <= 0.05 and sum(meta["counts"].values()) == len(profile["experts"])
    assert meta["calibration"]["tokens"] == TOKENS // 2  # the planner measures on the profile's windows
    assert read_manifest(conv).expert_bytes == meta["expert_bytes"]

    common = ("--text", text, "--context", CONTEXT, "--max-tokens", TOKENS, "--json", "-q", "-t", 1)
    base = json.loads(cli("eval", hf, *common)[0])
    in_ram = json.loads(cli("eval", hf, "--plan", plan, *common)[0])
    stored = json.loads(cli("eval", conv, "--memory", min_budget(conv), *common)[0])
    assert profile["calibration"]["reference_nll"] == pytest.approx(base["nll"], abs=2e-6)
    assert stored["ppl"] == pytest.approx(in_ram["ppl"], rel=1e-5)
    assert stored["expert_bytes"] == in_ram["expert_bytes"] == meta["expert_bytes"]
    assert in_ram["ppl"] / base["ppl"] - 1 == pytest.approx(meta["measured_loss"], abs=1e-5)


class _Scaled:
    """An expert whose output is the original's times `s`."""

    def __init__(self, expert, s: float):
        self.expert, self.s, self.nbytes = expert, s, expert.nbytes

    def __call__(self, x):
        return self.expert(x) * self.s


def test_profile_first_order_is_exact(family, text, monkeypatch):
    """In float64, scaling each expert's output by 1 + 1e-4 * (1..5) changes the seq2seq
    calibration NLL by the profiler's first-order term (to 2% of the largest): the
    gradient reaches the encoder's experts through cross-attention and NLLB's output
    scale is counted. One expert may be off (a capacity queue or near-tie flipped)."""
    from edgemoe.bitwidth import apply
    from edgemoe.bitwidth.profile import load_for_profiling, profile_model
    from edgemoe.experts import UngatedDenseExpert

    _, hf = family
    model, _, tok = load_for_profiling(hf)
    model.to(torch.float64)
    table = next(model.moe_blocks()).provider.table
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    for key, e in list(table.items()):
        table[key] = UngatedDenseExpert(e.w1.double(), e.w2.double(), model.args.expert_act, f64(e.b1), f64(e.b2))
    original = apply.ExpertVariants.expert

    def expert(self, key, fmt):
        if fmt == "int8":  # stands for the tiny change
            return _Scaled(self.originals[key], 1 + 1e-4 * (1 + (7 * key[0] + key[1]) % 5))
        return original(self, key, fmt)

    monkeypatch.setattr(apply.ExpertVariants, "expert", expert)
    prof = profile_model(model, tok, text.read_text(), formats=["int8"], top="fp32", calib_tokens=TOKENS,
                         context=CONTEXT, validate=10_000, validate_formats=["int8"])
    (v,) = prof["validation"]
    first = {(x["layer"], x["expert"]): x["first_order"]["int8"] for x in prof["experts"]}
    predicted = [first[tuple(k)] for k in v["experts"]]
    scale = max(abs(p) for p in predicted)
    assert scale > 0 and len(v["experts"]) == len(prof["experts"])
    off = [(k, m, p) for k, m, p in zip(v["experts"], v["measured"], predicted) if abs(m - p) > 0.02 * scale]
    assert len(off) <= 1, off
