"""RuntimeConfig (edgemoe/runtime/config.py): one validated set of options, the same from
the command line and from the API, listed in help(edgemoe.load), with the error messages
the options had before they were gathered."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

import edgemoe
from edgemoe import api, assets
from edgemoe.cli import eval as eval_cli
from edgemoe.cli import generate as generate_cli
from edgemoe.cli.common import runtime_config
from edgemoe.errors import EdgeMoEError, InvalidArgument, ModelLoadError
from edgemoe.runtime.config import RuntimeConfig
from edgemoe.store.manifest import ExpertPlan

NAMES = [f.name for f in fields(RuntimeConfig)]


def test_help_of_load_lists_every_option():
    for doc in (edgemoe.load.__doc__, api.load.__doc__):
        for name in NAMES:
            assert re.search(rf"^{name}: \S", doc, re.M), name


# (command-line flags, the same options given to the API); together every field is set.
CASES = [
    (["--dtype", "float32", "--memory", "800MB", "-t", "1", "--adaptive-gating", "0.8", "-c", "128", "--no-onednn",
      "--mode", "io-exp", "--cache-policy", "lru", "--verify", "always", "--no-direct-io",
      "--read-throttle", "90MB/s", "--predictor", "gate", "--prefetch-experts", "3", "--prefetch-layers", "2",
      "--prefetch-threads", "2", "--prefetch-threshold", "0.3", "--no-prefetch-pacing", "--no-read-ahead",
      "--cache-aware-routing", "0.1", "--fallback-below", "0.3"],
     dict(dtype="float32", memory=800_000_000, threads=1, adaptive_gating=0.8, ctx_size=128, onednn=False,
          mode="io-exp", cache_policy="lru", verify="always", direct_io=False, read_throttle=90_000_000,
          predictor="gate", prefetch_experts=3, prefetch_layers=2, prefetch_threads=2, prefetch_threshold=0.3,
          prefetch_pacing=False, read_ahead=False, cache_aware_routing=0.1, fallback_below=0.3)),
    (["--cache-policy", "belady", "--trace", "routing.npz", "--no-prefetch", "--mode", "io-free", "--memory", "1.5GB"],
     dict(cache_policy="belady", trace=Path("routing.npz"), prefetch=False, mode="io-free", memory="1.5GB")),
    ([], {}),
]


@pytest.mark.parametrize("flags,options", CASES)
def test_command_line_and_api_give_equal_configs(flags, options):
    args = generate_cli.build_parser().parse_args(["model", *flags])
    assert runtime_config(args) == RuntimeConfig.from_options(**options) == RuntimeConfig(**options)


def test_plan_and_parallel_from_the_command_line():
    args = eval_cli.build_parser().parse_args(["model", "--plan", "plan.json"])
    assert runtime_config(args, parallel=3) == RuntimeConfig(plan="plan.json", parallel=3)


def test_the_cases_set_every_option():
    seen = set()
    for _, options in CASES:
        seen |= set(options)
    assert seen | {"plan", "parallel"} == set(NAMES)


def test_read_ahead_defaults_on_except_with_belady():
    assert RuntimeConfig().reads_ahead and not RuntimeConfig(read_ahead=False).reads_ahead
    assert not RuntimeConfig(cache_policy="belady").reads_ahead
    assert RuntimeConfig(cache_policy="belady", read_ahead=True).reads_ahead


def test_sizes_and_rates_are_kept_in_bytes():
    c = RuntimeConfig(memory="1.5GiB", read_throttle="64MiB/s", cache_policy="belady", trace="t.npz")
    assert (c.memory, c.read_throttle, c.trace) == (1536 * 1024**2, 64 * 1024**2, Path("t.npz"))
    assert c == RuntimeConfig(memory=1536 * 1024**2, read_throttle=64 * 1024**2, cache_policy="belady",
                              trace=Path("t.npz"))
    with pytest.raises(Exception):
        c.memory = 1  # frozen


# Each message is the one the option had before the checks were gathered in RuntimeConfig.
INVALID = [
    (dict(mode="fast"), "unknown mode 'fast' (choose from io-exp, io-free)"),
    (dict(cache_policy="fifo"), "unknown cache policy 'fifo' (choose from "),
    (dict(trace="t.npz"), "a routing trace (--trace) is only used by --cache-policy belady"),
    (dict(memory="lots"), "cannot parse size 'lots'"),
    (dict(read_throttle="1KB/s"), "read rate '1KB/s' is below 4 KB/s"),
    (dict(predictor="oracle"), "unknown predictor 'oracle' (choose from auto, freq, table, gate, combined)"),
    (dict(prefetch_experts=0), "prefetch experts must be an integer of at least 1, got 0"),
    (dict(prefetch_layers=1.5), "prefetch layers must be an integer of at least 1, got 1.5"),
    (dict(prefetch_threads=True), "prefetch threads must be an integer of at least 1, got True"),
    (dict(prefetch_threshold=1.5), "prefetch threshold must be a probability from 0 to 1, got 1.5"),
    (dict(prefetch_pacing="yes"), "prefetch pacing must be True or False, got 'yes'"),
    (dict(prefetch=False, predictor="gate", prefetch_layers=2), "predictor, prefetch layers set with preloading off"),
    (dict(mode="io-free", cache_aware_routing=0.1), "cache-aware routing prefers experts already in memory"),
    (dict(cache_aware_routing=0), "cache-aware routing margin must be a routing-probability difference in (0, 1], got 0"),
    (dict(adaptive_gating=1.5), "adaptive gating mass must be in (0, 1], got 1.5"),
    (dict(verify="never"), "verify must be 'first' or 'always', got 'never'"),
    (dict(onednn="yes"), "onednn must be True or False, got 'yes'"),
    (dict(threads=0), "threads must be at least 1 and at most"),
    (dict(parallel=0), "parallel must be an integer from 1 to 64, got 0"),
    (dict(ctx_size=0), "ctx_size must be a positive integer, got 0"),
    (dict(direct_io="no"), "direct_io must be True or False, got 'no'"),
    (dict(read_ahead=1), "read_ahead must be True or False, got 1"),
]


@pytest.mark.parametrize("options,message", INVALID, ids=[next(iter(o)) + str(i) for i, (o, _) in enumerate(INVALID)])
def test_invalid_options_are_refused_before_anything_loads(options, message):
    with pytest.raises(EdgeMoEError, match=re.escape(message)):
        RuntimeConfig(**options)
    with pytest.raises(EdgeMoEError, match=re.escape(message)):  # the API: before the path is even looked at
        edgemoe.load("/nonexistent/model", **options)


def test_unknown_options_and_config_with_options():
    with pytest.raises(TypeError, match="unexpected option.*cache_polciy"):
        edgemoe.load(cache_polciy="lru")
    with pytest.raises(InvalidArgument, match="either config= or options"):
        edgemoe.load(config=RuntimeConfig(), memory="1GB")
    with pytest.raises(InvalidArgument, match="RuntimeConfig"):
        edgemoe.load(config={"memory": "1GB"})


def test_a_hugging_face_directory_refuses_offload_options_given_and_takes_them_not_given():
    with pytest.raises(ModelLoadError, match="memory budgets and runtime options need a converted model"):
        edgemoe.load(assets.MODEL_DIR, prefetch=False)
    assert RuntimeConfig(prefetch=False).offload_options() == ["prefetch"]
    assert RuntimeConfig(dtype="float32", threads=1, ctx_size=64).offload_options() == []


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(json.dumps(ExpertPlan("int8", layers={0: "int4"}).to_dict()))
    return path


def test_load_with_a_plan_quantizes_in_ram(plan_file):
    from edgemoe.bitwidth.apply import load_planned

    with edgemoe.load(assets.MODEL_DIR, plan=plan_file, dtype="float32", ctx_size=64) as engine:
        info = engine.info
        got = engine.generate("def add(a, b):", max_tokens=6, ignore_eos=True).token_ids
        n = engine.model.args.experts_per_layer
        assert info["kind"] == "hf+plan" and info["plan"] == str(plan_file)
        assert info["formats"] == {"int4": n, "int8": n * (len(engine.model.args.moe_layers()) - 1)}
        assert 0 < info["expert_bytes"] and info["ctx_size"] == 64 and info["dtype"] == "float32"
    # The same experts as bitwidth.apply.load_planned gives, so the same tokens.
    model, _, _ = load_planned(assets.MODEL_DIR, plan_file, "float32")
    with api.Engine(model, engine.tokenizer, engine.path, ctx_size=64) as same:
        assert same.generate("def add(a, b):", max_tokens=6, ignore_eos=True).token_ids == got


def test_a_plan_is_refused_with_offload_options_and_for_converted_models(plan_file, tmp_path):
    with pytest.raises(ModelLoadError, match="need a converted model"):
        edgemoe.load(assets.MODEL_DIR, plan=plan_file, memory="1GB")
    conv = tmp_path / "conv"
    conv.mkdir()
    from edgemoe.runtime.loading import load_converted

    with pytest.raises(InvalidArgument, match="--plan applies to Hugging Face directories"):
        load_converted(conv, plan=plan_file)
