"""Per-layer pruning budgets (`edgemoe prune --per-layer`): experts ranked over all layers,
smaller layers padded with unroutable slots (config.json `edgemoe_experts_per_layer`).
Checked: the global ranking by hand; the pruned model in edgemoe equals the original with
the removed experts' router logits at -inf; transformers gives the same logits where the
router has a correction bias; offloaded = in RAM; the store holds exactly the kept experts'
bytes; bad config values are refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import edgemoe
from edgemoe.checkpoint import HFCheckpoint, load_hf
from edgemoe.compress.prune import kept_globally, prune
from edgemoe.compress.stats import ExpertStats, LayerStats
from edgemoe.errors import InvalidArgument, ModelLoadError
from edgemoe.store.manifest import read_manifest

from cli.helpers import assert_clean_error, run_cli
from conftest import save_checkpoint
from store.helpers import make_checkpoint, make_converted, min_budget, run_prompts

FAST = dict(calib_tokens=1024, context=64)


def test_kept_globally_by_hand():
    a = LayerStats(torch.zeros(4), torch.tensor([0.9, 0.1, 0.8, 0.7]), torch.zeros(1, 2))
    b = LayerStats(torch.zeros(4), torch.tensor([0.05, 0.3, 0.2, 0.01]), torch.zeros(1, 2))
    stats = ExpertStats({0: a, 1: b}, 8)
    # Each layer first keeps its top 2 (layer 0: 0, 2; layer 1: 1, 2), then the best of the rest: 0.7 (layer 0).
    assert kept_globally(stats, 5, 2) == {0: [0, 2, 3], 1: [1, 2]}
    assert kept_globally(stats, 6, 2) == {0: [0, 1, 2, 3], 1: [1, 2]}  # 0.1 (layer 0) beats 0.05
    with pytest.raises(InvalidArgument, match="fewer than the 2"):
        kept_globally(stats, 3, 2)


def original_masked(src, kept: dict[int, list[int]]):
    """The original model in edgemoe with the removed experts' router logits at -inf: what
    pruning must equal, built without the padding machinery."""
    model, _ = load_hf(src, "float32")
    for block in model.moe_blocks():
        router, keep = block.router, kept[block.layer]
        drop = torch.tensor([e for e in range(router.num_experts) if e not in keep])
        plain = router.logits

        def logits(x, plain=plain, drop=drop):
            return plain(x).index_fill(-1, drop, float("-inf"))

        router.logits = logits
    return model


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("per_layer")
    src = make_checkpoint(d / "hf", "mixtral", tokenizer_dir, num_hidden_layers=2)  # 2 layers x 4 experts, top-2
    r = prune(src, d / "pruned", drop=0.375, per_layer=True, **FAST)  # 5 of 8 kept: the layers must differ
    return src, d / "pruned", r


def test_padded_model_equals_masked_original(pruned):
    src, out, r = pruned
    kept = {int(k): v for k, v in r["kept"].items()}
    counts = {l: len(v) for l, v in kept.items()}
    assert sorted(counts.values()) == [2, 3] and r["experts_per_layer"]["after"] == {str(l): n for l, n in
                                                                                      counts.items()}
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 3
    assert config["edgemoe_experts_per_layer"] == {str(l): n for l, n in counts.items()}
    before, after = dict(HFCheckpoint(src).tensors()), dict(HFCheckpoint(out).tensors())
    small = min(counts, key=counts.get)
    router = after[f"layers.{small}.mlp.router.weight"]
    assert torch.equal(router[:2], before[f"layers.{small}.mlp.router.weight"][kept[small]])
    assert torch.equal(router[2], torch.zeros_like(router[2]))  # the padding row
    assert torch.equal(after[f"experts.{small}.2.down"], after[f"experts.{small}.0.down"])  # a copy of slot 0
    ids = torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    model, _ = load_hf(out, "float32")
    assert [b.router.routable for b in model.moe_blocks()] == [counts[l] if counts[l] < 3 else None for l in counts]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), original_masked(src, kept)(ids), atol=1e-5, rtol=0)


def test_offloaded_equals_in_ram_and_store_holds_kept_bytes(pruned, tmp_path):
    _, out, r = pruned
    conv = make_converted(out, tmp_path / "conv")
    m = read_manifest(conv)
    one = m.experts[0].length
    kept = sum(len(v) for v in r["kept"].values())
    assert m.expert_bytes == kept * one  # padding shares its copy's blob: no bytes
    assert r["expert_bytes"]["after"] * 8 == kept * r["expert_bytes"]["before"]  # the report counts kept experts
    from edgemoe.evaluate import checkpoint_expert_bytes  # so does `edgemoe eval` on the directory

    assert checkpoint_expert_bytes(HFCheckpoint(out)) == r["expert_bytes"]["after"]
    engine = edgemoe.load(out)
    ref = run_prompts(engine)
    engine.close()
    engine = edgemoe.load(conv, memory=min_budget(conv), prefetch=False)
    try:
        assert run_prompts(engine) == ref
    finally:
        engine.close()


def test_transformers_routes_alike_with_a_correction_bias(tmp_path, tokenizer_dir):
    """DeepSeek-V3 with one group: the padding's -inf correction bias keeps transformers
    from choosing it, so transformers loads the padded model with edgemoe's logits."""
    import transformers as tf

    cfg = tf.DeepseekV3Config(vocab_size=384, bos_token_id=0, eos_token_id=1, max_position_embeddings=512,
                              hidden_size=64, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                              qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, moe_intermediate_size=24,
                              intermediate_size=48, num_hidden_layers=2, q_lora_rank=None, n_routed_experts=5,
                              num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=True,
                              n_shared_experts=0, first_k_dense_replace=0, tie_word_embeddings=False)
    src = tmp_path / "v3"
    save_checkpoint(cfg, src, tokenizer_dir)
    out = tmp_path / "pruned"
    r = prune(src, out, drop=0.3, per_layer=True, **FAST)  # 7 of 10: the layers differ
    assert len({len(v) for v in r["kept"].values()}) == 2
    ids = torch.randint(2, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model, _ = load_hf(out, "float32")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("value,needle", [
    ({"0": 3}, "does not list MoE layer"),
    ({"0": 3, "1": 1}, "between num_experts_per_tok (2)"),
    ({"0": 2, "1": 2}, "no layer uses all 3 experts"),
    ({"0": 3, "7": 2}, "'7' is not an MoE layer"),
])
def test_bad_counts_refused(pruned, tmp_path, value, needle):
    _, out, _ = pruned
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    config = json.loads((bad / "config.json").read_text())
    config["edgemoe_experts_per_layer"] = value
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="edgemoe_experts_per_layer") as info:
        load_hf(bad)
    assert needle in str(info.value) and str(bad) in str(info.value)
    if "7" in value:  # and once through a command: one line, no traceback
        assert_clean_error(run_cli("convert", str(bad), str(tmp_path / "conv")), needle)


def test_cli_per_layer_and_pruning_twice(pruned, tmp_path):
    src, out, _ = pruned
    proc = run_cli("prune", str(src), str(tmp_path / "p"), "--drop", "0.375", "--per-layer", "--calib-tokens", "512",
                   "--context", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(proc.stdout)["experts_per_layer"]["after"].values()) == [2, 3]
    assert_clean_error(run_cli("prune", str(out), str(tmp_path / "q"), "--drop", "0.3", "--calib-tokens", "512",
                               "--context", "64"), "already pruned per layer")


def test_profile_plan_convert_count_the_padding_once(pruned, tmp_path):
    """profile marks a padding slot as sharing its copy's blob, plan gives both one format
    and counts the blob once, and the converted store holds exactly the planned bytes."""
    from edgemoe.bitwidth.plan import Planner, make_plan
    from edgemoe.bitwidth.profile import run_profile
    from edgemoe.store.convert import convert

    _, out, r = pruned
    prof = run_profile(out, None, formats=["int8", "int2"], calib_tokens=256, context=64, validate=0)
    kept = sum(len(v) for v in r["kept"].values())
    pads = {(x["layer"], x["expert"]): tuple(x["shares"]) for x in prof["experts"] if "shares" in x}
    assert len(pads) == 2 * 3 - kept and all(owner == (layer, 0) for (layer, _), owner in pads.items())
    assert all(x["frequency"] == 0 for x in prof["experts"] if "shares" in x)  # never routed
    pl = Planner(prof)
    plan = make_plan(prof, target_size=(pl.sizes["int8"] + pl.sizes["int2"]) * kept // 2, verify=False)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    conv = tmp_path / "conv"
    convert(out, conv, plan=str(path))
    m = read_manifest(conv)
    assert m.expert_bytes == plan["meta"]["expert_bytes"] and plan["meta"]["blobs"] == kept
    assert {m.table()[k].blob_key for k in pads} == set(pads.values())
