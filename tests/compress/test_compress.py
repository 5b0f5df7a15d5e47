"""Expert pruning and merging: hand-checked selection, grouping, alignment and averaging;
the written directories load in transformers with the same logits as in edgemoe; the
commands end to end, and pruning composed with profile -> plan -> convert --plan."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from edgemoe.checkpoint import HFCheckpoint, load_hf
from edgemoe.compress.merge import align, group_experts, merge, merge_group
from edgemoe.compress.prune import keep_count, kept_experts, prune
from edgemoe.compress.stats import ExpertStats, LayerStats, calibration, measure
from edgemoe.errors import InvalidArgument

from cli.helpers import assert_clean_error, run_cli
from store.helpers import make_checkpoint, min_budget

FAST = dict(calib_tokens=1024, context=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("compress")
    return {f: make_checkpoint(d / f, f, tokenizer_dir, num_hidden_layers=2, **extra)
            for f, extra in (("mixtral", {}), ("qwen2_moe", {"norm_topk_prob": True}))}


def canonical(path) -> dict[str, torch.Tensor]:
    return dict(HFCheckpoint(path).tensors())


def transformers_logits(path, ids):
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


def test_kept_experts_by_hand():
    s = LayerStats(torch.zeros(4), torch.tensor([0.3, 0.1, 0.5, 0.1]), torch.zeros(1, 2))
    stats = ExpertStats({0: s, 2: LayerStats(torch.zeros(4), torch.tensor([0.0, 0.2, 0.1, 0.3]), torch.zeros(1, 2))}, 8)
    # layer 0: importance order 2, 0, then the tie 1/3 goes to the lower id; layer 2: 3, 1, 2.
    assert kept_experts(stats, 3) == {0: [0, 1, 2], 2: [1, 2, 3]}
    assert keep_count(8, 2, 0.25, None, 10, 4) == 6
    assert keep_count(8, 2, None, 4 * 10 * 5, 10, 4) == 5  # 5 experts of 10 bytes in each of 4 layers
    with pytest.raises(InvalidArgument, match="fewer than the 2"):
        keep_count(8, 2, 0.9, None, 10, 4)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_pruned_model_loads_in_transformers(models, tmp_path, family):
    src = models[family]
    out = tmp_path / "pruned"
    r = prune(src, out, drop=0.5, **FAST)
    kept = {int(k): v for k, v in r["kept"].items()}
    assert r["experts_per_layer"] == {"before": 4 if family == "mixtral" else 6, "after": 2 if family == "mixtral" else 3}
    before, after = canonical(src), canonical(out)
    for layer, ids in kept.items():
        router = before[f"layers.{layer}.mlp.router.weight"]
        assert torch.equal(after[f"layers.{layer}.mlp.router.weight"], router[ids])
        for new, old in enumerate(ids):
            for part in ("gate", "up", "down"):
                assert torch.equal(after[f"experts.{layer}.{new}.{part}"], before[f"experts.{layer}.{old}.{part}"])
        assert f"experts.{layer}.{len(ids)}.gate" not in after
    ids = torch.randint(2, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    model, _ = load_hf(out, "float32")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), transformers_logits(out, ids), atol=1e-4, rtol=0)


def test_measure_counts_every_routed_slot(models):
    model, _, ids, ctx = calibration(models["mixtral"], None, 512, 64)
    stats = measure(model, ids, ctx, sample=32)
    for s in stats.layers.values():
        assert abs(float(s.frequency.sum()) - model.args.top_k) < 1e-5  # each token picks k experts
        assert (s.importance >= 0).all() and s.importance.sum() > 0
        assert s.sample.shape == (32, model.args.hidden_size)


def test_alignment_recovers_a_permutation():
    g = torch.Generator().manual_seed(0)
    I, H = 12, 5
    centre = {"gate": torch.randn(I, H, generator=g), "up": torch.randn(I, H, generator=g),
              "down": torch.randn(H, I, generator=g)}
    p = torch.randperm(I, generator=g)
    member = {"gate": 2 * centre["gate"][p], "up": 2 * centre["up"][p], "down": 2 * centre["down"][:, p]}
    perm = align(centre, member)
    assert torch.equal(member["gate"][perm], 2 * centre["gate"])
    # Weights 0.75 / 0.25: 0.75 W + 0.25 * 2 W = 1.25 W once the member is aligned.
    merged = merge_group([centre, member], [0.3, 0.1])
    for k in ("gate", "up", "down"):
        torch.testing.assert_close(merged[k], 1.25 * centre[k])
    # No routing at all: plain average.
    torch.testing.assert_close(merge_group([centre, member], [0.0, 0.0])["up"], 1.5 * centre["up"])


def test_grouping_by_hand():
    # Experts 0 and 1 are the most used; 3's outputs point like 0's, 2's like 1's.
    s = LayerStats(torch.tensor([0.9, 0.6, 0.3, 0.2]), torch.zeros(4), torch.zeros(2, 2))
    outputs = torch.tensor([[[1.0, 0.0], [1.0, 0.1]], [[0.0, 1.0], [0.1, 1.0]],
                            [[0.1, 0.9], [0.0, 1.0]], [[0.8, 0.1], [0.9, 0.0]]])  # (E, S, H)
    assert group_experts(s, outputs, 2) == [[0, 3], [1, 2]]


def test_merged_model_shares_weights_and_loads_in_transformers(models, tmp_path):
    src = models["qwen2_moe"]
    out = tmp_path / "merged"
    r = merge(src, out, experts_per_layer=2, **FAST)
    before, after = canonical(src), canonical(out)
    for layer, groups in r["groups"].items():
        assert sorted(e for g in groups for e in g) == list(range(6)) and len(groups) == 2
        assert torch.equal(after[f"layers.{layer}.mlp.router.weight"], before[f"layers.{layer}.mlp.router.weight"])
        for g in groups:
            for e in g[1:]:
                assert torch.equal(after[f"experts.{layer}.{e}.down"], after[f"experts.{layer}.{g[0]}.down"])
    ids = torch.randint(2, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    model, _ = load_hf(out, "float32")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), transformers_logits(out, ids), atol=1e-4, rtol=0)


def test_commands_end_to_end(models, tmp_path):
    src = str(models["mixtral"])
    proc = run_cli("prune", src, str(tmp_path / "p"), "--drop", "0.5", "--calib-tokens", "512", "--context", "64",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["experts_per_layer"]["after"] == 2
    with safe_open(str(tmp_path / "p" / "model.safetensors"), "pt") as f:
        assert f.keys()
    proc = run_cli("merge", src, str(tmp_path / "m"), "--experts-per-layer", "3", "--calib-tokens", "512",
                   "--context", "64")
    assert proc.returncode == 0, proc.stderr
    assert "into 3" in proc.stdout
    proc = run_cli("generate", str(tmp_path / "m"), "-p", "def f(x):", "-n", "4", "--ignore-eos")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args,needles", [
    (["--drop", "1.5"], ["--drop must be in (0, 1)"]),
    (["--drop", "0.9"], ["fewer than the 2"]),
    (["--target-size", "lots"], ["cannot parse size 'lots'"]),
])
def test_prune_errors(models, tmp_path, args, needles):
    assert_clean_error(run_cli("prune", str(models["mixtral"]), str(tmp_path / "o"), "--calib-tokens", "512",
                               "--context", "64", *args), *needles)


def test_objective_required(models, tmp_path):
    proc = run_cli("prune", str(models["mixtral"]), str(tmp_path / "o"))
    assert proc.returncode == 2 and "one of the arguments --drop --target-size is required" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_output_must_be_empty_and_model_must_exist(models, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert_clean_error(run_cli("merge", str(models["mixtral"]), str(tmp_path / "full"), "--experts-per-layer", "2"),
                       "not empty")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert_clean_error(run_cli("prune", str(tmp_path / "nope"), str(tmp_path / "o"), "--drop", "0.5"), "nope")


def test_merge_then_profile_plan_convert(models, tmp_path):
    """merge -> profile -> plan -> convert --plan: the merged groups stay shared through a
    uniform plan, and the converted model runs offloaded with the in-RAM tokens."""
    src = str(models["mixtral"])
    merged = tmp_path / "m"
    proc = run_cli("merge", src, str(merged), "--experts-per-layer", "2", "--calib-tokens", "512", "--context", "64")
    assert proc.returncode == 0, proc.stderr
    prof, plan = tmp_path / "p.json", tmp_path / "plan.json"
    proc = run_cli("profile", str(merged), "-o", str(prof), "--calib-tokens", "512", "--validate", "1",
                   "--formats", "int8,int4", "--context", "64", "--no-plot", timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("plan", str(prof), "--max-loss", "5%", "-o", str(plan), "--max-evals", "2", "--no-plot")
    assert proc.returncode == 0, proc.stderr
    conv = tmp_path / "c"
    proc = run_cli("convert", str(merged), str(conv), "--plan", str(plan))
    assert proc.returncode == 0, proc.stderr
    from edgemoe.store.manifest import read_manifest

    m = read_manifest(conv)
    # Members of a group share a blob when the plan gives them the same format.
    fmt = {e.key: e.format for e in m.experts}
    shared = [e for e in m.experts if e.shares is not None]
    assert all(fmt[e.shares] == e.format for e in shared)
    prompt = ["generate", "-p", "def f(x):", "-n", "6", "--ignore-eos", "--json"]
    a = run_cli(prompt[0], str(conv), *prompt[1:])
    b = run_cli(prompt[0], str(conv), "--memory", str(min_budget(conv)), *prompt[1:])
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]
