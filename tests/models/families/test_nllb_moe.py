"""NLLB-MoE: tiny configs for the seq2seq parity checks (tests/test_seq2seq.py) and the
family's own tests (top-2 capacity routing by hand, routing and structure against
transformers, sinusoidal positions, sanitize, refusals).

transformers 5.24's NllbMoeExperts picks experts from the one-hot top-1 mask (expert_0
computes every top-2 slot, expert_1 every top-1 slot: `test_transformers_dispatch_bug`
pins this down). edgemoe computes what transformers 4.x and fairseq compute (expert e
runs the tokens routed to it), so the reference here is transformers with that dispatch
put right (`reference_patch`); everything else is transformers' own code."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import transformers as tf
from transformers.models.nllb_moe import modeling_nllb_moe

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import nllb_moe
from edgemoe.models.capacity import CapacityMoEBlock, Top2CapacityRouter
from edgemoe.models.seq2seq_blocks import sinusoidal_positions

from models import seq2seq_parity as sp

BASE = dict(vocab_size=384, bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
            max_position_embeddings=512)

SEQ2SEQ_CONFIGS = {
    # Untied tables, eval capacity 0.3 of the tokens (drops), tokens queued by their top
    # probability, weights normalised before dropping, router bias, encoder and decoder
    # head counts differ, every decoder layer MoE, scaled embeddings.
    "nllb-moe-untied-fraction": lambda: tf.NllbMoeConfig(
        **BASE, d_model=64, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=48, decoder_ffn_dim=48,
        encoder_attention_heads=4, decoder_attention_heads=2, num_experts=4, encoder_sparse_step=2,
        decoder_sparse_step=1, moe_eval_capacity_token_fraction=0.3, batch_prioritized_routing=True,
        normalize_router_prob_before_dropping=True, router_bias=True, tie_word_embeddings=False,
    ),
    # Tied table, a fixed expert capacity of 3 (a negative eval fraction), no expert
    # output scaling (moe_token_dropout 0), gelu, unscaled embeddings, 6 experts, every
    # encoder layer MoE and every second decoder layer.
    "nllb-moe-tied-capacity": lambda: tf.NllbMoeConfig(
        **BASE, d_model=48, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=40, decoder_ffn_dim=40,
        encoder_attention_heads=4, decoder_attention_heads=4, num_experts=6, encoder_sparse_step=1,
        decoder_sparse_step=2, expert_capacity=3, moe_eval_capacity_token_fraction=-1.0, moe_token_dropout=0.0,
        activation_function="gelu", scale_embedding=False, tie_word_embeddings=True,
    ),
}


def _routed_experts(self, hidden_states, router_mask, router_probs):
    """transformers 4.x's dispatch: expert e computes the tokens whose combine weight for
    e is non-zero, scaled by 1 - moe_token_dropout at inference, weighted, summed."""
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        sel = router_probs[:, e].bool()
        if sel.any():
            y = self[f"expert_{e}"](hidden_states[sel])
            if self.moe_token_dropout > 0:
                y = y * (1 - self.moe_token_dropout)
            out[sel] += router_probs[sel, e, None] * y
    return out


@contextlib.contextmanager
def reference_patch():
    """transformers' NLLB-MoE with its expert dispatch put right (see the module notes)."""
    saved = modeling_nllb_moe.NllbMoeExperts.forward
    modeling_nllb_moe.NllbMoeExperts.forward = _routed_experts
    try:
        yield
    finally:
        modeling_nllb_moe.NllbMoeExperts.forward = saved


@pytest.fixture(scope="module", params=sorted(SEQ2SEQ_CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = sp.save(SEQ2SEQ_CONFIGS[request.param](), out)
    model, _ = load_hf(out)
    return hf, model, out


def test_top2_capacity_by_hand():
    """Four tokens, three experts, capacity ceil(0.5 * 4) = 2 in token order. Probabilities
    (from logits log p): t0 (.6, .3, .1), t1 (.5, .4, .1), t2 (.7, .1, .2), t3 (.1, .2, .7).
    Top-1: e0, e0, e0, e2; top-2: e1, e1, e2, e1. Queues: e0 top-1 t0, t1, t2 -> t2 dropped;
    e1 top-2 slots queue behind its 0 top-1 slots: t0, t1 kept, t3 dropped (third);
    e2: t3's top-1 first, then t2's top-2 (second) kept. Weights renormalised over the
    kept slots: t0 (2/3, 1/3), t1 (5/9, 4/9), t2 (0, 1), t3 (1, 0)."""
    r = Top2CapacityRouter(3, 3, capacity=99, eval_fraction=0.5)
    with torch.no_grad():
        r.weight.copy_(torch.eye(3))
    p = torch.tensor([[.6, .3, .1], [.5, .4, .1], [.7, .1, .2], [.1, .2, .7]])
    weights, ids, logits = r(p.log())
    assert ids.tolist() == [[0, 1], [0, 1], [-1, 2], [2, -1]]
    want = torch.tensor([[2 / 3, 1 / 3], [5 / 9, 4 / 9], [0.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(weights, want, atol=1e-6, rtol=0)
    # Normalised before dropping: the dropped slot's share is lost (t2 keeps 0.2 / 0.9).
    r.normalize_before = True
    weights, _, _ = r(p.log())
    torch.testing.assert_close(weights[2], torch.tensor([0.0, 0.2 / 0.9]), atol=1e-6, rtol=0)
    # Queued by top probability (t2 .7 first, then t3, t0, t1): e0 keeps t2 and t0, drops t1.
    r.normalize_before, r.batch_prioritized = False, True
    _, ids, _ = r(p.log())
    assert ids[:, 0].tolist() == [0, -1, 0, 2]
    # A non-positive fraction uses the fixed capacity: 1 slot per expert.
    r.batch_prioritized, r.eval_fraction, r.capacity = False, -1.0, 1
    _, ids, _ = r(p.log())
    assert ids.tolist() == [[0, 1], [-1, -1], [-1, -1], [2, -1]]


def test_sinusoidal_positions_by_hand():
    """Positions count non-pad tokens from pad + 1 (pad = 1: 2, 3, ...), a pad token gets
    position `pad` and a zero embedding; after an offset the count continues. Dim 4:
    half 2, frequencies 1 and 1e-4: [sin p, sin(p/1e4), cos p, cos(p/1e4)]."""
    ids = torch.tensor([[5, 1, 7]])
    emb = sinusoidal_positions(ids, 4, pad=1)
    for t, p in ((0, 2), (2, 3)):
        want = torch.tensor([math.sin(p), math.sin(p * 1e-4), math.cos(p), math.cos(p * 1e-4)])
        torch.testing.assert_close(emb[0, t], want, atol=1e-6, rtol=0)
    assert not emb[0, 1].any()
    later = sinusoidal_positions(torch.tensor([[9]]), 4, pad=1, offset=3)
    torch.testing.assert_close(later[0, 0, 0], torch.tensor(math.sin(5.0)), atol=1e-6, rtol=0)


def test_transformers_dispatch_bug():
    """Pins down why the reference is patched: transformers 5.24 runs expert_1 on every
    top-1 slot and expert_0 on every top-2 slot, whatever the router chose."""
    torch.manual_seed(0)
    hf = tf.NllbMoeForConditionalGeneration(SEQ2SEQ_CONFIGS["nllb-moe-untied-fraction"]()).eval()
    mlp = hf.model.encoder.layers[1].ffn
    x = torch.randn(1, 9, 64)
    with torch.no_grad():
        top1, probs, _ = mlp.router(x.view(-1, 64))
        first = (probs * top1).sum(1, keepdim=True)
        wrong = (mlp.experts["expert_1"](x[0]) * first + mlp.experts["expert_0"](x[0]) * (probs.sum(1, keepdim=True)
                 - first)) * 0.8
        torch.testing.assert_close(mlp(x)[0], wrong, atol=1e-6, rtol=0)
        with reference_patch():
            right = mlp(x)[0]
    assert (right - wrong).abs().max() > 1e-3


def test_routing_matches_transformers(pair):
    """Router logits, chosen experts (capacity drops included) and weights of every MoE
    layer of both stacks equal transformers' on one forward."""
    hf, model, _ = pair
    src, tgt = sp.ids(384, sp.SRC, 7), sp.ids(384, sp.TGT, 8)
    stacks = (("enc", hf.model.encoder.layers), ("dec", hf.model.decoder.layers))
    routers = [(f"{s}.{i}", layer.ffn.router) for s, layers in stacks for i, layer in enumerate(layers)
               if layer.is_sparse]
    theirs = {}
    hooks = [r.register_forward_hook(lambda m, a, o, n=n: theirs.__setitem__(n, o)) for n, r in routers]
    try:
        with torch.no_grad(), reference_patch():
            hf(input_ids=src, decoder_input_ids=tgt)
    finally:
        for h in hooks:
            h.remove()
    ours = {}
    for b in model.moe_blocks():
        b.hook = lambda layer, i, w, lg: ours.__setitem__(layer, (i, w, lg))
    try:
        with torch.no_grad():
            model(src, tgt)
    finally:
        for b in model.moe_blocks():
            b.hook = None
    assert sorted(ours) == model.args.moe_layers() and len(ours) == len(theirs)
    dropped = 0
    for layer, (name, _) in zip(sorted(ours), routers):
        _, gates, logits = theirs[name]  # combine weights (N, E): top-1 + top-2 after capacity; logits (N, E)
        got_ids, got_w, got_logits = ours[layer]
        torch.testing.assert_close(got_logits, logits, atol=sp.ATOL, rtol=1e-3)
        ours_dense = torch.zeros_like(gates).scatter_add_(1, got_ids.clamp_min(0), got_w * (got_ids >= 0))
        torch.testing.assert_close(ours_dense, gates, atol=sp.ATOL, rtol=0)
        assert torch.equal(ours_dense > 0, gates > 0)
        dropped += int((got_ids < 0).sum())
    assert dropped  # both configs really drop slots


def test_structure_matches_transformers(pair):
    hf, model, _ = pair
    cfg = hf.config
    enc = [i for i, layer in enumerate(hf.model.encoder.layers) if layer.is_sparse]
    dec = [j for j, layer in enumerate(hf.model.decoder.layers) if layer.is_sparse]
    assert model.args.moe_layers() == enc + [cfg.encoder_layers + j for j in dec]
    assert [isinstance(layer.mlp, CapacityMoEBlock) for layer in model.decoder] == \
        [layer.is_sparse for layer in hf.model.decoder.layers]
    assert [b.layer for b in model.moe_blocks()] == model.args.moe_layers()
    assert model.args.expert_gated is False and model.args.top_k == 2
    assert model.decoder[0].attn.heads == cfg.decoder_attention_heads
    assert model.encoder[0].attn.heads == cfg.encoder_attention_heads
    assert all(b.out_scale == 1 - cfg.moe_token_dropout for b in model.moe_blocks())
    assert model.embed_scale == (math.sqrt(cfg.d_model) if cfg.scale_embedding else None)
    assert hasattr(model, "lm_head") != cfg.tie_word_embeddings


def test_sanitize_names():
    args = nllb_moe.ModelArgs.from_dict(SEQ2SEQ_CONFIGS["nllb-moe-untied-fraction"]().to_dict())
    t = torch.zeros(1)
    s = lambda n: nllb_moe.sanitize(n, t, args)  # noqa: E731
    assert s("model.decoder.layers.1.ffn.experts.expert_3.fc1.bias")[0][0] == "experts.3.3.gate_bias"
    assert s("model.encoder.layers.1.ffn.experts.expert_0.fc2.weight")[0][0] == "experts.1.0.down"
    assert s("model.decoder.layers.0.cross_attention.out_proj.bias")[0][0] == "decoder.0.cross.o.bias"
    assert s("model.encoder.embed_tokens.weight")[0][0] == "embed.weight" and s("model.shared.weight") == []
    assert s("model.decoder.embed_positions.weights") == []
    with pytest.raises(ModelLoadError, match="unexpected tensor"):
        s("model.encoder.layers.0.cross_attention.q_proj.weight")


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="config.json: second_expert_policy 'sampling' is not supported"):
        nllb_moe.ModelArgs.from_dict(dict(config, second_expert_policy="sampling"))
    with pytest.raises(ModelLoadError, match="config.json: router_dtype 'float16' is not supported"):
        nllb_moe.ModelArgs.from_dict(dict(config, router_dtype="float16"))
    with pytest.raises(ModelLoadError, match="config.json: encoder_ffn_dim .* and decoder_ffn_dim .* differ"):
        nllb_moe.ModelArgs.from_dict(dict(config, decoder_ffn_dim=config["encoder_ffn_dim"] + 8))
    with pytest.raises(ModelLoadError, match="config.json: pad_token_id is missing"):
        nllb_moe.ModelArgs.from_dict(dict(config, pad_token_id=None))
    with pytest.raises(ModelLoadError, match="config.json: moe_token_dropout must be below 1"):
        nllb_moe.ModelArgs.from_dict(dict(config, moe_token_dropout=1.0))
    with pytest.raises(ModelLoadError, match="config.json: moe_eval_capacity_token_fraction must be a number"):
        nllb_moe.ModelArgs.from_dict(dict(config, moe_eval_capacity_token_fraction="all"))
