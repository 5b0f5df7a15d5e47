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
