"""The lab's random checkpoint (edgemoe_lab.checkpoints): a real Mixtral checkpoint that
transformers and edgemoe load alike, written once per spec."""

import json

import pytest
import torch

from edgemoe_lab.checkpoints import MixtralSpec, write_random_mixtral

TINY = MixtralSpec(layers=2, experts=4, top_k=2, hidden=64, inter=128, heads=2, kv_heads=1, head_dim=32, seed=3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_mixtral(tmp_path_factory.mktemp("bench") / "hf", TINY)


def test_transformers_loads_it_and_edgemoe_matches(ckpt):
    from transformers import MixtralForCausalLM

    import edgemoe

    ref = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    assert sum(p.numel() for p in ref.parameters()) == TINY.params(vocab)
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    with torch.no_grad():
        want = ref(ids).logits
    engine = edgemoe.load(ckpt, dtype="float32")
    with torch.no_grad():
        got = engine.model(ids, engine.model.make_cache())
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_written_once_and_refuses_another_spec(ckpt):
    mtime = (ckpt / "config.json").stat().st_mtime_ns
    write_random_mixtral(ckpt, TINY)
    assert (ckpt / "config.json").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError):
        write_random_mixtral(ckpt, MixtralSpec(layers=1, experts=2, hidden=64, inter=64, heads=2, kv_heads=1,
                                               head_dim=32))


def test_routers_spread_more_than_the_rest(ckpt):
    from safetensors.torch import load_file

    t = load_file(str(next(ckpt.glob("model-00001-*.safetensors"))))
    assert t["model.layers.0.block_sparse_moe.gate.weight"].float().std() > 10 * \
        t["model.layers.0.block_sparse_moe.experts.0.w1.weight"].float().std()


def test_default_spec_is_the_documented_size():
    s = MixtralSpec()
    assert 2.2e9 < s.params(4096) < 2.5e9 and s.expert_params / s.params(4096) > 0.9


def test_vocab_size_widens_the_embedding_only(tmp_path):
    from edgemoe_lab.checkpoints import _vocab_size, bundled_tokenizer_dir

    tok_vocab = _vocab_size(bundled_tokenizer_dir())
    path = write_random_mixtral(tmp_path / "wide", TINY, vocab_size=tok_vocab + 100)
    assert json.loads((path / "config.json").read_text())["vocab_size"] == tok_vocab + 100
    mtime = (path / "config.json").stat().st_mtime_ns
    write_random_mixtral(path, TINY, vocab_size=tok_vocab + 100)  # same spec and vocabulary: kept
    assert (path / "config.json").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError):
        write_random_mixtral(path, TINY)  # another vocabulary is another model
    with pytest.raises(ValueError, match="below the tokenizer"):
        write_random_mixtral(tmp_path / "narrow", TINY, vocab_size=tok_vocab - 1)


def test_checkpoints_written_before_the_lab_moved_are_kept(ckpt):
    from edgemoe_lab.checkpoints import LEGACY_GENERATOR

    stamp_file = ckpt / "bench_model.json"
    stamp = json.loads(stamp_file.read_text())
    stamp_file.write_text(json.dumps({**stamp, "generator": LEGACY_GENERATOR}))
    mtime = (ckpt / "config.json").stat().st_mtime_ns
    write_random_mixtral(ckpt, TINY)
    assert (ckpt / "config.json").stat().st_mtime_ns == mtime
