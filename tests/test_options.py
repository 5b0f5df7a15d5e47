"""GenerateOptions (edgemoe/options.py): the options of one generation call, in one typed
object that Engine.stream, generate, chat and generate_batch share, listed in their help."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

import edgemoe
from edgemoe.api import Engine
from edgemoe.options import GenerateOptions


def test_help_of_stream_lists_every_option():
    for f in fields(GenerateOptions):
        assert re.search(rf"^\s+{f.name}: \S", Engine.stream.__doc__, re.M), f.name


@pytest.fixture(scope="module")
def engine():
    with edgemoe.load(ctx_size=64) as e:
        yield e


def test_options_reach_the_call_and_unknown_ones_are_refused(engine):
    greedy = engine.generate("def add(a, b):", max_tokens=5, ignore_eos=True)
    scored = engine.generate("def add(a, b):", max_tokens=5, ignore_eos=True, logprobs=2)
    assert greedy.token_ids == scored.token_ids and len(greedy.token_ids) == 5 and greedy.stats.extra == {}
    with pytest.raises(TypeError, match=r"Engine.stream\(\) got unexpected option\(s\) temprature"):
        engine.generate("x", temprature=0.5)
    with pytest.raises(TypeError, match="Engine.generate_batch"):
        engine.generate_batch(["x"], max_token=3)
    with pytest.raises(edgemoe.errors.InvalidArgument, match="max_tokens must be an integer >= 1, got 0"):
        engine.generate("x", max_tokens=0)
