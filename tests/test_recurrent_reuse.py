"""Chat turns on a hybrid recurrent model: a follow-up prompt that shares only part of the
cached sequence is recomputed from the start (a recurrent state cannot be trimmed back),
and one that extends it reuses the state; both give the tokens of a fresh run."""

from __future__ import annotations

import edgemoe
from models import parity
from models.families.test_jamba import CONFIGS


def test_prefix_reuse_with_recurrent_state(tmp_path, tokenizer_dir):
    parity.save(next(iter(CONFIGS.values()))(), tmp_path, tokenizer_dir)
    engine = edgemoe.load(tmp_path)
    fresh = edgemoe.load(tmp_path)
    try:
        a = [0, 5, 9, 33, 40, 41]
        first = engine.generate(a, max_tokens=4, ignore_eos=True).token_ids
        # Diverges inside the cached sequence: must recompute, not trim the state.
        b = [0, 5, 9, 70, 71]
        assert engine.generate(b, max_tokens=4, ignore_eos=True).token_ids == \
            fresh.generate(b, max_tokens=4, ignore_eos=True).token_ids
        # Extends the cached sequence exactly: reuses it.
        c = b + fresh.generate(b, max_tokens=4, ignore_eos=True).token_ids + [12]
        assert engine.generate(c, max_tokens=4, ignore_eos=True).token_ids == \
            edgemoe.load(tmp_path).generate(c, max_tokens=4, ignore_eos=True).token_ids
        assert len(first) == 4
    finally:
        engine.close()
        fresh.close()


def test_state_in_the_budget_and_info(tmp_path, tokenizer_dir):
    """The recurrent state is counted once per sequence, the same in `info` as at load."""
    import json

    from cli.helpers import run_cli
    from store.helpers import make_converted

    parity.save(next(iter(CONFIGS.values()))(), tmp_path / "hf", tokenizer_dir)
    conv = make_converted(tmp_path / "hf", tmp_path / "conv")
    engine = edgemoe.load(conv)
    try:
        state = engine.model.state_bytes()
        assert state > 0 and engine.info["state_bytes"] == state
        minimum = engine.info["min_budget_bytes"]
    finally:
        engine.close()
    info = json.loads(run_cli("info", str(conv), "--json").stdout)
    assert info["state_bytes"] == state and info["memory"]["min_budget_bytes"] == minimum
    with_two = edgemoe.load(conv, parallel=2)
    try:
        assert with_two.info["state_bytes"] == 2 * state
    finally:
        with_two.close()
