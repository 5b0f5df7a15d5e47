"""Encoder-decoder families (SEQ2SEQ_CONFIGS of tests/models/families/test_*.py) against
transformers on tiny random weights: encoder outputs and fp32 logits, cached decode
against the full decoder forward, 32 greedy tokens against `generate`; the offloaded
runtime against the in-RAM model (identical tokens at the smallest budget, with
preloading and unlimited); ungated experts in quantized formats; routing traces of both
stacks; the seq2seq loss; bad input."""

from __future__ import annotations

import pytest
import torch

from edgemoe import seq2seq
from edgemoe.checkpoint import load_hf
from edgemoe.errors import ContextLengthError, EdgeMoEError, InvalidArgument
from edgemoe.experts import UngatedDenseExpert
from edgemoe.quant.formats import UngatedFormat, get_format
from edgemoe.runtime.loading import load_converted
from edgemoe.runtime.trace import RoutingTrace
from edgemoe.store.convert import convert

from models import seq2seq_parity as sp

CONFIGS = sp.all_configs()
SOURCES = [[5, 17, 93, 211, 8, 48, 150, 260, 31, 77, 12, 40, 41, 42, 43, 44], [300, 301, 4, 9, 120]]
NEW = 10
CTX = 64

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny models on a busy 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    name = request.param
    mod, factory = CONFIGS[name]
    out = tmp_path_factory.mktemp(name)
    hf = sp.save(factory(), out, gain=getattr(mod, "GAIN", 1.0))
    model, _ = load_hf(out)
    return name, mod, hf, model, out


def run(model, sources=SOURCES, n=NEW) -> list[list[int]]:
    return [seq2seq.generate(model, s, max_tokens=n, ignore_eos=True) for s in sources]


def test_forward_matches_transformers(case):
    _, mod, hf, model, _ = case
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with sp.reference(mod):
        sp.check_forward(hf, model)


def test_cached_decode_matches_full_forward(case):
    sp.check_incremental(case[3])


def test_greedy_matches_transformers_generate(case):
    _, mod, hf, model, _ = case
    with sp.reference(mod):
        tokens = sp.check_greedy(hf, model)
        if model.args.model_type == "nllb-moe":  # a translation-style prompt: [start, target language]
            sp.check_greedy(hf, model, prompt=[model.args.decoder_start_token_id, 17])
            # The language forced as transformers' forced_bos_token_id: a forward of its own.
            src = sp.ids(model.args.vocab_size, 9, 5)
            want = hf.generate(src, do_sample=False, max_new_tokens=17, min_new_tokens=17, forced_bos_token_id=17,
                               decoder_start_token_id=model.args.decoder_start_token_id)[0, 2:].tolist()
            assert list(seq2seq.generate_step(model, src[0].tolist(), max_tokens=16, forced=[17])) == want
    assert len(tokens) == 32


def test_offloaded_tokens_match_in_ram(case, tmp_path):
    """Both stacks' experts go through the offloaded provider: at the smallest budget, at
    one that leaves room to preload, and unlimited the tokens are the in-RAM model's."""
    _, _, _, model, hf_dir = case
    ref = run(model)
    conv = tmp_path / "conv"
    convert(hf_dir, conv)
    probe, info = load_converted(conv, ctx_size=CTX)
    next(probe.moe_blocks()).provider.close()
    smallest, one_layer = info["min_budget_bytes"], info["min_cache_bytes"]
    for memory, prefetch in ((smallest, True), (smallest + 2 * one_layer, True), (None, False)):
        om, info = load_converted(conv, memory=memory, ctx_size=CTX, prefetch=prefetch)
        provider = next(om.moe_blocks()).provider
        asked = set()
        serve = provider.experts
        provider.experts = lambda layer, *a, **k: (asked.add(layer), serve(layer, *a, **k))[1]
        try:
            assert run(om) == ref, (memory, prefetch)
        finally:
            provider.close()
        assert asked == set(model.args.moe_layers())  # every MoE layer of both stacks
        if memory == smallest + 2 * one_layer:
            assert info["prefetch"] is True
    assert info["expert_bytes"] == info["cache_bytes"]


def test_offloaded_bf16_matches_in_ram(case, tmp_path):
    """bf16 compute (fp32 routers): the converted model's tokens are the in-RAM model's."""
    hf_dir = case[4]
    ref = run(load_hf(hf_dir, dtype="bf16")[0])
    conv = convert(hf_dir, tmp_path / "bf16", dtype="bf16").out
    om, info = load_converted(conv, ctx_size=CTX)
    try:
        assert info["dtype"] == "bfloat16" and run(om) == ref
    finally:
        next(om.moe_blocks()).provider.close()


@pytest.mark.parametrize("fmt", ["int8", "int4", "int3-asym"])
def test_ungated_quantized_experts(fmt):
    """An ungated expert stored in a quantized format computes what the float expert
    does within the format's error, from views of the one-matrix layout."""
    g = torch.Generator().manual_seed(0)
    H, I = 64, 48
    w1, w2 = torch.randn(I, H, generator=g) / 8, torch.randn(H, I, generator=g) / 7
    b1, b2 = torch.randn(I, generator=g) / 10, torch.randn(H, generator=g) / 10
    f = UngatedFormat(get_format(fmt))
    parts = f.encode(w1, None, w2)
    assert {k: tuple(v.shape) for k, v in parts.items()} == {s.name: s.shape for s in f.layout(H, I)}
    parts.update(b13=b1, b2=b2)
    x = torch.randn(5, H, generator=g)
    want = UngatedDenseExpert(w1, w2, "relu", b1, b2)(x)
    got = f.expert(parts, "relu", torch.float32)(x)
    tol = {"int8": 0.02, "int4": 0.15, "int3-asym": 0.3}[fmt]
    assert (got - want).norm() / want.norm() < tol
    assert f.bits_per_weight(H, I) < 16
    assert [s.shape for s in f.bias_layout(H, I, torch.float32)] == [(I,), (H,)]


def test_converted_formats(case, tmp_path):
    """convert --format int8 stores the one-matrix layout and the runtime runs it (tokens
    close to the float ones are not guaranteed: only that it loads and generates); MXFP4,
    which has no ungated layout, is refused by name."""
    _, _, _, model, hf_dir = case
    conv = convert(hf_dir, tmp_path / "q8", fmt="int8").out
    om, info = load_converted(conv, ctx_size=CTX)
    try:
        assert len(run(om, SOURCES[:1], 4)[0]) == 4
    finally:
        next(om.moe_blocks()).provider.close()
    with pytest.raises(EdgeMoEError, match="'mxfp4' cannot store ungated experts"):
        convert(hf_dir, tmp_path / "fp4", fmt="mxfp4")


def test_trace_covers_both_stacks(case, tmp_path):
    """Every forward (the encoder's, each decoder step) is a trace row block holding all
    MoE positions: the other stack's as -1."""
    _, _, _, model, _ = case
    rec = seq2seq.Seq2SeqTraceRecorder(model)
    try:
        seq2seq.generate(model, SOURCES[0], max_tokens=3, ignore_eos=True)
    finally:
        rec.detach()
    trace = rec.save(tmp_path / "t.npz")
    trace = RoutingTrace.load(tmp_path / "t.npz")
    split, S = rec.split, len(SOURCES[0])
    assert trace.forward_tokens.tolist() == [S, 1, 1, 1]  # the encoder, the decoder start, two steps
    assert trace.ids.shape == (S + 3, len(model.args.moe_layers()), model.args.top_k)
    assert (trace.ids[:S, split:] == -1).all() and (trace.ids[S:, :split] == -1).all()
    assert (trace.ids[S:, split:] >= 0).all()  # one decode token is never over capacity
    assert seq2seq.trace_rows(trace, "encoder", split).shape[0] == S
    assert seq2seq.trace_rows(trace, "decoder", split).shape[0] == 3


def test_score_matches_transformers_loss(case):
    _, mod, hf, model, _ = case
    src, tgt = SOURCES[0], [7, 8, 9, 10, 11, 12]
    nll, n = seq2seq.score(model, src, tgt)
    with sp.reference(mod), torch.no_grad():
        loss = hf(input_ids=torch.tensor([src]), labels=torch.tensor([tgt])).loss
    assert n == len(tgt)
    assert nll / n == pytest.approx(float(loss), abs=1e-4)


def test_bad_input(case):
    model = case[3]
    with pytest.raises(InvalidArgument, match="source must contain at least one token"):
        seq2seq.generate(model, [], max_tokens=2)
    with pytest.raises(InvalidArgument, match="source token id 9999 is outside the vocabulary"):
        seq2seq.generate(model, [5, 9999], max_tokens=2)
    with pytest.raises(ContextLengthError, match="the source has 5 tokens, more than the context size of 4"):
        seq2seq.generate(model, [5] * 5, max_tokens=2, cache=model.make_cache(4))
    with pytest.raises(ContextLengthError, match="context is full"):
        seq2seq.generate(model, [5] * 4, max_tokens=8, cache=model.make_cache(4), ignore_eos=True)
