"""Switch Transformers: tiny configs for the seq2seq parity checks (tests/test_seq2seq.py)
and the family's own tests (top-1 capacity routing by hand, routing and structure
against transformers, relative position buckets, sanitize, refusals).

The configs are SEQ2SEQ_CONFIGS, not CONFIGS: test_family_parity.py builds CONFIGS as
decoder-only models."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import switch_transformers
from edgemoe.models.capacity import CapacityMoEBlock, Top1CapacityRouter
from edgemoe.models.seq2seq_blocks import relative_buckets

from models import seq2seq_parity as sp

BASE = dict(vocab_size=384, eos_token_id=1, pad_token_id=0, decoder_start_token_id=0)

SEQ2SEQ_CONFIGS = {
    # Tied embeddings (d_model^-0.5 before the head), capacity 3 of 4 experts (20-token
    # sources drop tokens), MoE on encoder layers 1 and 3 and decoder layer 1, few
    # relative buckets with a short max distance (log buckets and the clamp in use).
    "switch_transformers-tied-capacity": lambda: tf.SwitchTransformersConfig(
        **BASE, d_model=64, d_kv=16, d_ff=48, num_heads=4, num_layers=4, num_decoder_layers=2,
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=12, tie_word_embeddings=True,
    ),
    # Untied (three tables), heads*d_kv != d_model, every encoder layer MoE (3 // 2: step
    # 1), num_sparse_decoder_layers 0 (transformers' rule still makes decoder layer 1 MoE),
    # router bias, gelu experts, 6 experts with room for every token. (A decoder deeper
    # than the encoder loads here, but transformers' generate sizes its cache by the
    # encoder and fails on it.)
    "switch_transformers-untied-bias": lambda: tf.SwitchTransformersConfig(
        **BASE, d_model=64, d_kv=12, d_ff=40, num_heads=4, num_layers=3, num_decoder_layers=2,
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=0, num_experts=6, expert_capacity=64,
        router_bias=True, dense_act_fn="gelu", tie_word_embeddings=False,
    ),
}
GAIN = 1.5  # seq2seq_parity.save: tiny Switch models repeat one token at gain 1 (2 amplifies fp32 error)


@pytest.fixture(scope="module", params=sorted(SEQ2SEQ_CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = sp.save(SEQ2SEQ_CONFIGS[request.param](), out, gain=GAIN)
    model, _ = load_hf(out)
    return hf, model, out


def test_top1_capacity_by_hand():
    """Logits make tokens 0, 1 and 3 pick expert 0 and token 2 expert 1; with capacity 2
    token 3 is the third in expert 0's queue and is dropped (id -1, weight 0). Weights are
    the top softmax probability: e^2 / (e^2 + 1) for logits (2, 0)."""
    r = Top1CapacityRouter(2, 2, capacity=2)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]])  # (1, 4, 2)
    weights, ids, logits = r(x)
    assert ids.flatten().tolist() == [0, 0, 1, -1]
    p = torch.e**2 / (torch.e**2 + 1)
    torch.testing.assert_close(weights.flatten(), torch.tensor([p, p, p, 0.0]), atol=1e-6, rtol=0)
    assert logits.shape == (4, 2)
    # Capacity is counted per sequence: the same tokens as two sequences of two drop nothing.
    _, ids, _ = r(x.view(2, 2, 2))
    assert ids.flatten().tolist() == [0, 0, 1, 0]


def test_capacity_block_skips_dropped_tokens():
    """A dropped token gets no expert output; a kept one gets weight * expert(x)."""
    from edgemoe.experts import UngatedDenseExpert
    from edgemoe.models.moe import InRAMProvider

    r = Top1CapacityRouter(2, 2, capacity=1)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    block = CapacityMoEBlock(0, r)
    eye = torch.eye(2)
    block.provider = InRAMProvider({(0, 0): UngatedDenseExpert(eye, eye), (0, 1): UngatedDenseExpert(eye, 2 * eye)})
    x = torch.tensor([[[2.0, 0.0], [3.0, 0.0], [0.0, 1.0]]])
    out = block(x)
    p0, p2 = torch.softmax(torch.tensor([2.0, 0.0]), 0)[0], torch.softmax(torch.tensor([0.0, 1.0]), 0)[1]
    want = torch.tensor([[[2.0 * p0, 0.0], [0.0, 0.0], [0.0, 2.0 * p2]]])
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_relative_buckets_by_hand():
    """8 buckets, max distance 12. Bidirectional: 4 per direction, distances 0, 1 exact,
    then 2 + floor(log(d/2)/log(6)*2): 2..4 -> 2, 5 and beyond -> 3 (the last); keys after
    the query offset by 4. Causal: 8 buckets over past distances, 0..3 exact, then
    4 + floor(log(d/4)/log(3)*4): 5 -> 4, 6 -> 5, 8 -> 6, 11 -> 7, beyond clamped to 7."""
    rel = torch.tensor([0, -1, -2, -3, -4, -5, -11, -40, 1, 2, 5])
    assert relative_buckets(rel, True, 8, 12).tolist() == [0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 7]
    rel = torch.tensor([0, -1, -3, -4, -5, -6, -8, -11, -40, 3])
    assert relative_buckets(rel, False, 8, 12).tolist() == [0, 1, 3, 4, 4, 5, 6, 7, 7, 0]


def test_routing_matches_transformers(pair):
    """Router logits, chosen experts (capacity drops included) and weights of every MoE
    layer of both stacks equal transformers' on one forward."""
    hf, model, _ = pair
    src, tgt = sp.ids(384, sp.SRC, 7), sp.ids(384, sp.TGT, 8)
    routers = [(f"{s}.{i}", blk.layer[-1].mlp.router) for s, stack in (("enc", hf.encoder), ("dec", hf.decoder))
               for i, blk in enumerate(stack.block) if blk.is_sparse]
    theirs = {}
    hooks = [r.register_forward_hook(lambda m, a, o, n=n: theirs.__setitem__(n, o)) for n, r in routers]
    try:
        with torch.no_grad():
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
        dispatch, probs, logits = theirs[name]  # (1, T, E) one-hot after capacity, (1, T, 1), (1, T, E)
        got_ids, got_w, got_logits = ours[layer]
        # fp32 rounding grows with the residual stream (T5 does not scale it): relative tolerance too
        torch.testing.assert_close(got_logits, logits.view(-1, logits.shape[-1]), atol=sp.ATOL, rtol=1e-3)
        kept = dispatch.view(-1, dispatch.shape[-1]).sum(-1).bool()
        want_ids = dispatch.view(-1, dispatch.shape[-1]).argmax(-1).masked_fill(~kept, -1)
        assert got_ids.flatten().tolist() == want_ids.tolist()
        torch.testing.assert_close(got_w.flatten(), probs.flatten() * kept, atol=sp.ATOL, rtol=0)
        dropped += int((~kept).sum())
    if model.args.expert_capacity < sp.SRC // model.args.num_experts:
        assert dropped  # the capacity config really drops tokens


def test_structure_matches_transformers(pair):
    """The MoE layers of both stacks, layer ids after the encoder's, heads, tied scaling."""
    hf, model, _ = pair
    cfg = hf.config
    enc = [i for i, b in enumerate(hf.encoder.block) if b.is_sparse]
    dec = [j for j, b in enumerate(hf.decoder.block) if b.is_sparse]
    assert model.args.moe_layers() == enc + [cfg.num_layers + j for j in dec]
    assert [isinstance(layer.mlp, CapacityMoEBlock) for layer in model.encoder] == [b.is_sparse for b in hf.encoder.block]
    assert [isinstance(layer.mlp, CapacityMoEBlock) for layer in model.decoder] == [b.is_sparse for b in hf.decoder.block]
    assert [b.layer for b in model.moe_blocks()] == model.args.moe_layers()
    assert model.args.expert_gated is False and model.args.top_k == 1 and model.args.expert_dim == cfg.d_ff
    assert model.encoder[0].attn.head_dim == cfg.d_kv and model.encoder[0].attn.scale == 1.0
    assert (model.head_scale is not None) == cfg.tie_word_embeddings
    assert hasattr(model, "lm_head") != cfg.tie_word_embeddings


def test_sanitize_names():
    args = switch_transformers.ModelArgs.from_dict(SEQ2SEQ_CONFIGS["switch_transformers-tied-capacity"]().to_dict())
    t = torch.zeros(1)
    s = lambda n: switch_transformers.sanitize(n, t, args)  # noqa: E731
    assert s("decoder.block.1.layer.2.mlp.experts.expert_3.wi.weight")[0][0] == "experts.5.3.gate"
    assert s("encoder.block.3.layer.1.mlp.experts.expert_0.wo.weight")[0][0] == "experts.3.0.down"
    assert s("decoder.block.0.layer.1.layer_norm.weight")[0][0] == "decoder.0.norm_cross.weight"
    assert s("decoder.block.0.layer.2.layer_norm.weight")[0][0] == "decoder.0.norm2.weight"
    assert s("shared.weight")[0][0] == "embed.weight" and s("encoder.embed_tokens.weight") == []
    with pytest.raises(ModelLoadError, match="unexpected tensor"):
        s("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight")
    with pytest.raises(ModelLoadError, match="unexpected tensor"):
        s("encoder.block.0.layer.2.mlp.wi.weight")  # the encoder's feed-forward is sublayer 1


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="config.json: router_dtype 'bfloat16' is not supported"):
        switch_transformers.ModelArgs.from_dict(dict(config, router_dtype="bfloat16"))
    with pytest.raises(ModelLoadError, match="config.json: dense_act_fn 'gated-gelu' is not supported"):
        switch_transformers.ModelArgs.from_dict(dict(config, dense_act_fn="gated-gelu"))
    with pytest.raises(ModelLoadError, match="config.json: expert_capacity must be positive"):
        switch_transformers.ModelArgs.from_dict(dict(config, expert_capacity=0))
    with pytest.raises(ModelLoadError, match="config.json: is_encoder_decoder false"):
        switch_transformers.ModelArgs.from_dict(dict(config, is_encoder_decoder=False))
    with pytest.raises(ModelLoadError, match="config.json: decoder_start_token_id is missing"):
        switch_transformers.ModelArgs.from_dict({k: v for k, v in config.items() if k != "decoder_start_token_id"})
