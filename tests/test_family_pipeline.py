"""The whole pipeline for every model family (issue 13 §3), each step through the
command line (in process, `edgemoe.cli.run`), on each family's first tiny config:

1. profile -> plan --max-loss -> convert --plan -> eval: the profile's reference NLL is
   the model's own, the plan's measured loss is what eval reports, the store holds the
   bytes the plan counted, and the converted model evaluates as the plan applied in RAM;
   the profiler's first-order estimate equals the measured effect of a tiny expert change
   (float64), whatever the family does around its experts;
2. trace -> fit-predictor -> generate with the fitted predictor under a budget (same
   tokens as without prefetching and as the plan in RAM); the gate look-ahead ranks a
   router's own input exactly as the router chooses;
3. adaptive gating where the router kind allows it (same tokens under a budget and
   without one, fewer experts requested), a refusal naming the router kind where it does not;
4. `edgemoe serve` answers /v1/completions with the tokens `generate` gives;
5. a config option transformers accepts but the family does not implement is refused at
   load, naming the option (issue 13 §4).

Every family in edgemoe.models.FAMILIES must have a tiny config: the first entry of
CONFIGS in tests/models/families/test_<family>.py (conftest.tiny_config for the first four).
Encoder-decoder families (SEQ2SEQ_CONFIGS there) score a target given a source: profile,
plan, eval and trace cut the text into source/target pairs, and their pipeline is tested
in tests/test_seq2seq_tools.py (serve and generate: tests/test_seq2seq_engine.py).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import logging
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import CORPUS, tiny_config
from edgemoe.cli import run as cli_run
from edgemoe.models import FAMILIES

from models import parity

CONTEXT = 32
CALIB_TOKENS = 4 * CONTEXT  # four windows, all searched (--holdback 0): eval measures the same loss
PROMPT = "def add(a, b):"
NEW = 5
ORIGINAL = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")  # configs in conftest.tiny_config



def _family_module(family: str):
    """tests/models/families/test_<family>.py, or None."""
    name = f"models.families.test_{family}"
    return importlib.import_module(name) if importlib.util.find_spec(name) is not None else None


ALL_FAMILIES = sorted({module.rsplit(".", 1)[1] for module in FAMILIES.values()})
# Encoder-decoder families (their tests define SEQ2SEQ_CONFIGS): tests/test_seq2seq_tools.py.
SEQ2SEQ_NAMES = [f for f in ALL_FAMILIES if f not in ORIGINAL and hasattr(_family_module(f), "SEQ2SEQ_CONFIGS")]
FAMILY_NAMES = [f for f in ALL_FAMILIES if f not in SEQ2SEQ_NAMES]

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster than two on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def first_config(family: str):
    """The family's first tiny transformers config."""
    if family in ORIGINAL:
        return tiny_config(family)
    module = _family_module(family)
    if module is None:
        pytest.fail(f"{family}: no tests/models/families/test_{family}.py with tiny CONFIGS", pytrace=False)
    configs = getattr(module, "CONFIGS", None)
    if not configs:
        pytest.fail(f"{family}: tests/models/families/test_{family}.py defines no CONFIGS", pytrace=False)
    return next(iter(configs.values()))()


def cli(*argv) -> tuple[str, str]:
    """Run an edgemoe command in process; (stdout, stderr) on success, else a failure
    showing its error."""
    code, out, err = cli_status(*argv)
    assert code == 0, f"edgemoe {argv[0]} exited {code}: {err[-2000:]}"
    return out, err


def cli_status(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_run([str(a) for a in argv])
        except SystemExit as e:  # argparse errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def generate(model, *args) -> dict:
    out, _ = cli("generate", model, "--prompt", PROMPT, "-n", NEW, "--json", "--ignore-eos", "-t", 1, *args)
    return json.loads(out)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request, tmp_path_factory, tokenizer_dir):
    """(family name, its tiny Hugging Face checkpoint, fp32, with the test tokenizer).
    Biases transformers initialises to zero (gpt-oss's expert biases, attention biases)
    are randomised: a step that dropped them would otherwise go unnoticed."""
    name = request.param
    hf = tmp_path_factory.mktemp(name) / "hf"
    model = parity.save(first_config(name), hf, tokenizer_dir)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        zero = [p for n, p in model.named_parameters() if n.endswith("bias") and not p.any()]
        for p in zero:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if zero:
        model.save_pretrained(hf)
    return name, hf


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CORPUS * 2, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def converted(family, calib):
    """profile -> plan --max-loss -> convert --plan, once per family."""
    name, hf = family
    d = hf.parent
    prof, plan, conv = d / "profile.json", d / "plan.json", d / "conv"
    cli("profile", hf, "-o", prof, "--calib", calib, "--context", CONTEXT, "--calib-tokens", CALIB_TOKENS,
        "--formats", "int8,int4,int2", "--validate", 2, "--no-plot", "-q", "-t", 1)
    cli("plan", prof, "--max-loss", "5%", "-o", plan, "--max-evals", 2, "--holdback", 0, "--no-plot", "-q", "-t", 1)
    cli("convert", hf, conv, "--plan", plan, "--quiet")
    return name, hf, json.loads(prof.read_text()), json.loads(plan.read_text()), plan, conv


def budget(conv: Path, share: float = 0.5) -> int:
    """A memory budget holding `share` of the experts beyond the minimum (prefetching needs
    room for two layers)."""
    out, _ = cli("info", conv, "--json")
    info = json.loads(out)
    return info["memory"]["min_budget_bytes"] + int(share * (info["expert_cache_bytes"] - info["min_cache_bytes"]))


# ----------------------------------------------------------------------------- 1. profile, plan, convert, eval


def test_profile_plan_convert_eval(converted, calib):
    from edgemoe.checkpoint import load_hf
    from edgemoe.evaluate import eval_tokens, perplexity
    from edgemoe.tokenizer import Tokenizer

    name, hf, profile, plan, plan_path, conv = converted
    # The profile's reference NLL (its validation reruns the model from each layer on) is
    # the model's own on the same windows: the rerun ends as the forward does.
    model, _ = load_hf(hf, "float32")
    ids = eval_tokens(Tokenizer(hf, eos_token_ids=model.args.eos_ids), calib.read_text(), CONTEXT, CALIB_TOKENS)
    want = perplexity(model, ids, CONTEXT)
    assert profile["calibration"]["tokens"] == want["tokens"] == CALIB_TOKENS
    assert profile["calibration"]["reference_nll"] == pytest.approx(want["nll"], abs=2e-6)

    meta = plan["meta"]
    assert meta["measured_loss"] <= 0.05
    assert len(meta["counts"]) >= 1 and sum(meta["counts"].values()) == len(profile["experts"])
    manifest = json.loads((conv / "manifest.json").read_text())
    assert sum(-(-e["size"] // 4096) * 4096 for e in manifest["experts"]) == meta["expert_bytes"]

    common = ("--text", calib, "--context", CONTEXT, "--max-tokens", CALIB_TOKENS, "--json", "-q", "-t", 1)
    stored = json.loads(cli("eval", conv, "--memory", budget(conv), *common)[0])
    in_ram = json.loads(cli("eval", hf, "--plan", plan_path, *common)[0])
    base = json.loads(cli("eval", hf, *common)[0])
    assert stored["expert_bytes"] == in_ram["expert_bytes"] == meta["expert_bytes"]
    assert stored["ppl"] == pytest.approx(in_ram["ppl"], rel=1e-5)
    assert base["nll"] == pytest.approx(want["nll"], abs=2e-6)
    # The loss the planner measured (no held-back part) is the one eval reports.
    assert in_ram["ppl"] / base["ppl"] - 1 == pytest.approx(meta["measured_loss"], abs=1e-5)


class _Scaled:
    """An expert whose output is the original's times `s`: a change small enough that the
    loss responds linearly."""

    def __init__(self, expert, s: float):
        self.expert, self.s, self.nbytes = expert, s, expert.nbytes

    def __call__(self, x):
        return self.expert(x) * self.s


def test_profile_first_order_is_exact(family, calib, monkeypatch):
    """In float64, scaling each expert's output by 1 + 1e-4 * (1..5) changes the
    calibration NLL by what the profiler's first-order term says, to 2% of the largest
    prediction: the profiler sees each expert's true input (Gemma 4: a norm of the block's),
    its true weighting (Llama 4: of the input) and the gradient at the experts' combined
    output (cohere2's averaged block, Granite's scaled residuals)."""
    from edgemoe.bitwidth import apply
    from edgemoe.bitwidth.profile import load_for_profiling, profile_model
    from edgemoe.experts import DenseExpert

    name, hf = family
    model, _, tok = load_for_profiling(hf)
    model.to(torch.float64)
    table = next(model.moe_blocks()).provider.table
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    for key, e in list(table.items()):
        table[key] = DenseExpert.from_stacked(e.w13.double(), e.w2.double(), model.args.expert_act, f64(e.b13),
                                              f64(e.b2))
    original = apply.ExpertVariants.expert

    def expert(self, key, fmt):
        if fmt == "int8":  # stands for the tiny change
            return _Scaled(self.originals[key], 1 + 1e-4 * (1 + (7 * key[0] + key[1]) % 5))
        return original(self, key, fmt)

    monkeypatch.setattr(apply.ExpertVariants, "expert", expert)
    prof = profile_model(model, tok, calib.read_text(), formats=["int8"], top="fp32", calib_tokens=CALIB_TOKENS,
                         context=CONTEXT, validate=10_000, validate_formats=["int8"])
    (v,) = prof["validation"]
    assert len(v["experts"]) == len(prof["experts"])
    first = {(x["layer"], x["expert"]): x["first_order"]["int8"] for x in prof["experts"]}
    predicted = [first[tuple(k)] for k in v["experts"]]
    scale = max(abs(p) for p in predicted)
    assert scale > 0
    off = [(k, m, p) for k, m, p in zip(v["experts"], v["measured"], predicted) if abs(m - p) > 0.02 * scale]
    # One expert may be off: its change flipped a later router's near-tie (dots1), a jump
    # no derivative sees. A profiler that misreads the experts' inputs, weights or
    # gradient is off for (nearly) all of them.
    assert len(off) <= 1, off


# ----------------------------------------------------------------------------- 2. trace, fit-predictor, generate


@torch.no_grad()
def test_lookahead_ranks_as_the_router(family):
    """Each router's look-ahead scores, applied to the router's own input, put exactly the
    experts it chose on top (grouped routers: corrected scores, kept groups; SparseMixer:
    the two largest logits; Llama 4: the logits; Gemma 4: its scaled norm); and the
    provider, which predicts with them at run time, is told that same input (Gemma 4's
    experts see a norm of it)."""
    from edgemoe.checkpoint import load_hf
    from edgemoe.runtime.trace import RoutingRecorder

    _, hf = family
    model, _ = load_hf(hf, "float32")
    seen, told = [], {}

    class Rec(RoutingRecorder):
        def on_route(self, i, ids, weights, logits):
            seen.append((i, self.x.clone(), ids.clone()))

    provider = next(model.moe_blocks()).provider
    experts = provider.experts

    def spy(layer, ids, x, rows=None):
        told[layer] = x.clone()
        return experts(layer, ids, x, rows)

    provider.experts = spy
    rec = Rec(model, inputs=True)
    try:
        model(parity.prompt_ids(model.args.vocab_size, batch=2))
    finally:
        rec.detach()
        del provider.experts
    assert len(seen) == len(rec.blocks) == len(told)
    for i, x, ids in seen:
        router = rec.blocks[i].router
        top = router.lookahead_logits(x).topk(ids.shape[1], dim=-1).indices  # (N, k)
        assert top.sort(dim=-1).values.tolist() == ids.sort(dim=-1).values.tolist(), (router.kind, i)
        assert torch.equal(told[rec.layers[i]], x)


def test_trace_fit_generate_with_predictor(converted, calib, tmp_path):
    from edgemoe.bitwidth.apply import load_planned
    from edgemoe.generate import generate_step
    from edgemoe.tokenizer import Tokenizer

    name, hf, _, _, plan_path, conv = converted
    trace = tmp_path / "trace.npz"
    out, _ = cli("trace", conv, "--text", calib, "-o", trace, "--window", CONTEXT, "--max-tokens", CALIB_TOKENS,
                 "--lookahead", 1, "--json")
    assert json.loads(out)["lookahead_depth"] == 1
    report = json.loads(cli("fit-predictor", conv, "--trace", trace, "--json")[0])
    assert {"freq@1", "table@1", "gate@1", "combined@1"} <= set(report["results"])
    assert (conv / "predictor.npz").is_file()
    prefetched = generate(conv, "--memory", budget(conv), "--predictor", "combined")
    assert prefetched["stats"]["prefetch"] is True and prefetched["stats"]["predictor"] == "combined"
    plain = generate(conv, "--no-prefetch")
    assert prefetched["token_ids"] == plain["token_ids"]
    # The same plan in RAM gives the same greedy tokens.
    model, _, _ = load_planned(hf, plan_path, "float32")
    prompt = Tokenizer(hf, eos_token_ids=model.args.eos_ids).encode(PROMPT)
    assert list(generate_step(model, prompt, max_tokens=NEW)) == plain["token_ids"]


# ----------------------------------------------------------------------------- 3. adaptive gating


def test_adaptive_gating_or_refusal(converted):
    from edgemoe.models.routers import Router

    name, hf, _, _, _, conv = converted
    from edgemoe.checkpoint import load_hf

    model, _ = load_hf(hf, "float32")
    routers = [m for m in model.modules() if isinstance(m, Router)]
    refused = sorted({r.kind for r in routers if not r.supports_adaptive})
    mem = budget(conv)
    if refused:
        code, _, err = cli_status("generate", conv, "--prompt", PROMPT, "-n", 1, "--adaptive-gating", "0.5")
        assert code == 1 and "Traceback" not in err
        assert "--adaptive-gating" in err and f"{refused[0]} router" in err, err
        return
    # A mass below 1/E: every token keeps its first expert only, whatever the routing.
    mass = str(0.5 / max(r.num_experts for r in routers))
    adaptive = generate(conv, "--memory", mem, "--no-prefetch", "--adaptive-gating", mass)
    plain = generate(conv, "--memory", mem, "--no-prefetch")
    unlimited = generate(conv, "--adaptive-gating", mass)
    assert adaptive["token_ids"] == unlimited["token_ids"]
    assert adaptive["load"]["adaptive_gating"] == float(mass)
    requests = lambda r: r["stats"]["hits"] + r["stats"]["misses"]  # noqa: E731
    assert requests(adaptive) < requests(plain)


# ----------------------------------------------------------------------------- 4. serve


def test_serve_completions(converted, monkeypatch):
    """`edgemoe serve` (its main, in a thread) answers a greedy /v1/completions request with
    the text `edgemoe generate` gives."""
    import edgemoe.server as server_module

    name, _, _, _, _, conv = converted
    started: list = []
    ready = threading.Event()
    make = server_module.make_server

    def capture(*args, **kwargs):
        server = make(*args, **kwargs)
        started.append(server)
        ready.set()
        return server

    monkeypatch.setattr(server_module, "make_server", capture)
    logger = logging.getLogger("edgemoe.server")
    handlers = list(logger.handlers)
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("code", cli_run(["serve", str(conv), "--port", "0", "-t", "1"])), daemon=True)
    thread.start()
    try:
        assert ready.wait(60), "the server did not start"
        host, port = started[0].server_address[:2]
        body = json.dumps({"prompt": PROMPT, "max_tokens": NEW, "temperature": 0, "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://{host}:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
    finally:
        if started:
            started[0].shutdown()
        thread.join(60)
        for h in logger.handlers[len(handlers):]:
            logger.removeHandler(h)
    assert result.get("code") == 0
    assert answer["usage"]["completion_tokens"] == NEW
    assert answer["choices"][0]["text"] == generate(conv, "--no-prefetch")["text"]


# ----------------------------------------------------------------------------- 5. refusals

# A transformers-supported RoPE variant edgemoe does not implement for these families.
LONGROPE = {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0],
                                "long_factor": [1.0]}}
ROPE_REFUSED = "rope type 'longrope' is not supported"
# One option per family that transformers' config accepts (and its model would act on)
# but edgemoe does not implement: loading refuses it, naming the option. Found with a
# one-key-at-a-time perturbation of every config key against transformers' logits (no key
# was silently ignored); most families' refusals are their own switches.
REFUSALS = {
    "afmoe": ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new' is not supported"),
    "cohere2_moe": ({"expert_selection_fn": "sparsemixer"}, "expert_selection_fn 'sparsemixer' is not supported"),
    "dbrx": ({"tie_word_embeddings": True}, "tie_word_embeddings is not supported"),
    "deepseek_v2": ({"mlp_bias": True}, "mlp_bias true is not supported"),
    "deepseek_v3": ({"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported"),
    "dots1": (LONGROPE, ROPE_REFUSED),
    "ernie4_5_moe": (LONGROPE, ROPE_REFUSED),
    "exaone_moe": (LONGROPE, ROPE_REFUSED),
    "flex_olmo": (LONGROPE, ROPE_REFUSED),
    "gemma4": ({"num_kv_shared_layers": 1}, "num_kv_shared_layers 1 (KV sharing between layers) is not supported"),
    "glm4_moe": ({"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported"),
    "glm4_moe_lite": ({"moe_layer_freq": 2}, "moe_layer_freq 2 is not supported"),
    "gpt_oss": ({"swiglu_limit": 10.0}, "swiglu_limit 10.0 is not supported"),
    "granitemoe": (LONGROPE, ROPE_REFUSED),
    "granitemoehybrid": ({"position_embedding_type": "alibi"}, "position_embedding_type"),
    "granitemoeshared": (LONGROPE, ROPE_REFUSED),
    "hunyuan_v1_moe": ({"use_cla": True}, "use_cla True is not supported"),
    "jamba": ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new' is not supported"),
    "jetmoe": ({"activation_function": "gelu_new"}, "'gelu_new' is not supported"),
    "lfm2_moe": (LONGROPE, ROPE_REFUSED),
    "llama4": (LONGROPE, ROPE_REFUSED),
    "minimax_m2": ({"use_routing_bias": False}, "use_routing_bias False is not supported"),
    "mixtral": (LONGROPE, ROPE_REFUSED),
    "olmoe": (LONGROPE, ROPE_REFUSED),
    "phimoe": ({"num_experts_per_tok": 3}, "num_experts_per_tok 3 is not supported"),
    "qwen2_moe": (LONGROPE, ROPE_REFUSED),
    "qwen3_5_moe": ({"attention_bias": True}, "attention_bias true is not supported"),
    "qwen3_moe": (LONGROPE, ROPE_REFUSED),
    "qwen3_next": ({"attention_bias": True}, "attention_bias true is not supported"),
    "sarvam_moe": (LONGROPE, ROPE_REFUSED),
}


def test_refuses_an_unimplemented_option(family, tmp_path):
    import re
    import shutil

    from edgemoe.checkpoint import load_hf
    from edgemoe.errors import ModelLoadError

    name, hf = family
    assert name in REFUSALS, f"{name}: add an option it refuses to REFUSALS"
    options, fragment = REFUSALS[name]
    d = tmp_path / "refused"
    shutil.copytree(hf, d)
    config = json.loads((d / "config.json").read_text())
    target = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    if "rope_parameters" in options:
        target.pop("rope_scaling", None)
    target.update(options)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=re.escape(fragment)):
        load_hf(d)
    code, _, err = cli_status("generate", d, "--prompt", PROMPT, "-n", 1)
    assert code == 1 and "Traceback" not in err and fragment in err
