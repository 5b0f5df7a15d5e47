"""Seeded fuzz of model directories: config values of the wrong type or out of range,
missing keys, deleted/renamed/reshaped/retyped tensors, broken index and tokenizer
files, and edited configs inside a converted model's (re-signed) manifest.

The contract for every case: either the model loads and generates a couple of tokens
(and renders its chat template), or loading raises a ModelLoadError (StoreError for a
converted directory) whose one-line message names the model directory. Any other
exception fails the case. Cases whose mutation is certainly invalid must fail to load;
cases that are certainly harmless must load. A sample of the cases also runs through
`edgemoe generate`, which must exit 0 or print exactly one `edgemoe: error:` line and
no traceback.

Reproduce one case with `pytest tests/fuzz -k <case id>`; the cases and their random
choices depend only on SEED.
"""

from __future__ import annotations

import json
import random
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from cli.helpers import assert_clean_error, run_cli
from conftest import save_checkpoint, tiny_config
from safetensors.torch import load_file, save_file

import edgemoe
from edgemoe.errors import ModelLoadError, StoreError
from edgemoe.models import get_family
from edgemoe.store.manifest import MANIFEST_NAME, _checksum

SEED = 20261124
FAMILIES = ("qwen2_moe", "mixtral", "qwen3_moe", "olmoe")
CLI_SAMPLE = 10  # cases also run through the CLI (a subprocess each, ~1.5 s)

OK, ERROR, ANY = "ok", "error", "any"


@dataclass
class Case:
    id: str
    base: str  # a family name (Hugging Face directory) or "converted"
    mutate: Callable[[Path, random.Random], None]
    expect: str = ANY


# ----------------------------------------------------------------------------- file edits


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data = fn(data) or data
    path.write_text(json.dumps(data))


def set_key(key, value):
    def fn(d):
        d[key] = value
    return fn


def del_key(key):
    def fn(d):
        d.pop(key, None)
    return fn


def edit_config(key, value=None, delete=False):
    return lambda p, rng: edit_json(p / "config.json", del_key(key) if delete else set_key(key, value))


def edit_rope(**params):
    def fn(d):
        rope = dict(d.get("rope_parameters") or {"rope_theta": 10000.0, "rope_type": "default"})
        rope.update(params)
        d["rope_parameters"] = rope
    return lambda p, rng: edit_json(p / "config.json", fn)


def edit_tensors(fn):
    def mutate(p: Path, rng: random.Random) -> None:
        file = p / "model.safetensors"
        tensors = load_file(str(file))
        fn(tensors, rng)
        save_file(tensors, str(file), metadata={"format": "pt"})
    return mutate


def pick(tensors: dict, rng: random.Random) -> str:
    return rng.choice(sorted(tensors))


def edit_manifest(fn, resign: bool = True):
    """Edit manifest.json and, like the converter, put the checksum of the new body in it."""
    def mutate(p: Path, rng: random.Random) -> None:
        data = json.loads((p / MANIFEST_NAME).read_text())
        fn(data)
        if resign:
            data["checksum"] = _checksum(data)
        (p / MANIFEST_NAME).write_text(json.dumps(data))
    return mutate


# ----------------------------------------------------------------------------- cases

# Values every field of a kind must refuse: the wrong JSON type (a bool is not a number,
# 4.0 is not an integer) or, for floats, not a finite positive number.
WRONG = {
    int: ["8", 2.5, True, [2], {"n": 2}, 4.0],
    float: ["abc", True, [1.0], {"x": 1.0}, float("nan"), float("inf"), -1e-5, 0],
    bool: ["yes", 1, 0, [True]],
    str: [5, ["silu"], {"name": "silu"}],
    list: ["abc", 5, [[1]], {"0": 1}],
    dict: ["abc", 5, [1], {"0": "x"}, {"zero": 2}],
}
NEGATIVE = [-1, -64]
# Fields where 0 is meaningful in some family (token ids, "no experts", "no shared
# expert", "no window"); 0 anywhere else must be refused.
MAY_BE_ZERO = {"bos_token_id", "eos_token_id", "num_experts", "num_experts_per_tok", "shared_expert_intermediate_size",
               "mlp_only_layers", "max_window_layers", "sliding_window"}
SKIP = {"rope_theta", "rope_scaling"}  # read from rope_parameters; fuzzed by the rope cases


def kind_of(tp) -> type:
    """The main kind of a (possibly optional) dataclass field type."""
    members = [m for m in typing.get_args(tp) or (tp,) if m is not type(None)]
    first = members[0]
    return list if typing.get_origin(first) is list else first


def field_types(family: str) -> dict:
    cls = get_family(family).ModelArgs
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in cls.__dataclass_fields__ if name not in SKIP}


def config_cases(rng: random.Random, n: int) -> list[Case]:
    out = []
    for i in range(n):
        family = rng.choice(FAMILIES)
        types_ = field_types(family)
        key = rng.choice(sorted(types_))
        kind = kind_of(types_[key])
        roll = rng.random()
        if roll < 0.6:
            # eos_token_id is int | list[int]: only values wrong for both.
            value = rng.choice(WRONG[kind] if key != "eos_token_id" else ["7", [[1]], {"0": 1}, 2.5, True])
            expect = ERROR
        elif roll < 0.8 and kind in (int, float):
            value = rng.choice(NEGATIVE)
            expect = ERROR
        elif roll < 0.9 and kind is int:
            value = 0
            expect = ANY if key in MAY_BE_ZERO else ERROR
        else:
            value = rng.choice([10**9, 3, 2**40, 7])
            expect = ANY
        if key == "model_type" and kind is str:
            expect = ERROR
        out.append(Case(f"cfg{i}-{family}-{key}={value!r}", family, edit_config(key, value), expect))
    # Deleted keys: required ones must be reported, others fall back to defaults.
    for i, key in enumerate(["model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                             "num_key_value_heads", "rope_parameters", "eos_token_id", "intermediate_size"]):
        family = FAMILIES[i % len(FAMILIES)]
        required = key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        out.append(Case(f"del{i}-{family}-{key}", family, edit_config(key, delete=True), ERROR if required else ANY))
    return out


def rope_cases() -> list[Case]:
    bad = [
        dict(rope_theta="abc"), dict(rope_theta=0), dict(rope_theta=-10000.0), dict(rope_theta=float("nan")),
        dict(rope_type="linear"), dict(rope_type="linear", factor="x"), dict(rope_type="linear", factor=0),
        dict(rope_type="linear", factor=[2]), dict(rope_type=["yarn"]), dict(rope_type="dynamic", factor=2.0),
        dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0),
        dict(rope_type="llama3", factor=8.0, low_freq_factor="1"),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=0),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128.5),
        dict(rope_type="yarn", factor=4.0, beta_fast="32"), dict(rope_type="yarn", factor=4.0, truncate="no"),
    ]
    good = [
        dict(rope_type="linear", factor=2.0), dict(rope_type="yarn", original_max_position_embeddings=128),
        dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=128),
        dict(rope_type="yarn", factor=4.0, mscale=0, beta_fast=0),
    ]
    out = [Case(f"rope{i}-{p}", FAMILIES[i % 4], edit_rope(**p), ERROR) for i, p in enumerate(bad)]
    out += [Case(f"ropeok{i}-{p}", FAMILIES[i % 4], edit_rope(**p), OK) for i, p in enumerate(good)]
    out += [
        Case("rope-params-list", "mixtral", edit_config("rope_parameters", [1, 2]), ERROR),
        Case("rope-params-str", "olmoe", edit_config("rope_parameters", "default"), ERROR),
        Case("rope-scaling-list", "qwen3_moe", edit_config("rope_scaling", [1]), ERROR),
    ]
    return out


def semantic_cases() -> list[Case]:
    c = edit_config
    return [
        Case("kv-heads-0", "mixtral", c("num_key_value_heads", 0), ERROR),
        Case("kv-heads-3", "qwen2_moe", c("num_key_value_heads", 3), ERROR),
        Case("kv-heads-8", "olmoe", c("num_key_value_heads", 8), ERROR),
        Case("head-dim-odd", "qwen3_moe", c("head_dim", 23), ERROR),
        Case("head-dim-neg", "qwen3_moe", c("head_dim", -24), ERROR),
        Case("top-k-too-big", "mixtral", c("num_experts_per_tok", 5), ERROR),
        Case("eps-0", "olmoe", c("rms_norm_eps", 0.0), ERROR),
        Case("window-0-mixtral", "mixtral", c("sliding_window", 0), ERROR),
        Case("window-neg-qwen2", "qwen2_moe", c("sliding_window", -5), ERROR),
        Case("window-used-0", "qwen2_moe",
             lambda p, r: edit_json(p / "config.json", lambda d: d.update(use_sliding_window=True, sliding_window=0)),
             ERROR),
        Case("layers-huge", "qwen2_moe", c("num_hidden_layers", 10**12), ERROR),
        Case("experts-huge", "mixtral", c("num_local_experts", 10**9), ERROR),
        Case("act-unknown", "olmoe", c("hidden_act", "swiglu"), ERROR),
        Case("model-type-list", "mixtral", c("model_type", ["mixtral"]), ERROR),
        Case("model-type-llama", "mixtral", c("model_type", "llama"), ERROR),
        Case("eos-dict", "qwen3_moe", c("eos_token_id", {"id": 1}), ERROR),
        Case("eos-list", "qwen3_moe", c("eos_token_id", [1, 2]), OK),
        Case("unknown-key", "olmoe", c("my_extension", {"anything": [1, "x"]}), OK),
        Case("layer-types-short", "qwen2_moe", c("layer_types", ["full_attention"]), ERROR),
        Case("mlp-only-str", "qwen3_moe", c("mlp_only_layers", ["1"]), ERROR),
        Case("config-empty", "mixtral", lambda p, r: (p / "config.json").write_text(""), ERROR),
        Case("config-list", "mixtral", lambda p, r: (p / "config.json").write_text("[]"), ERROR),
        Case("config-binary", "olmoe", lambda p, r: (p / "config.json").write_bytes(b"\xff\xfe{\x00"), ERROR),
        Case("config-long-int", "qwen3_moe",
             lambda p, r: (p / "config.json").write_text('{"model_type": "qwen3_moe", "vocab_size": ' + "9" * 5000 + "}"),
             ERROR),
        Case("config-deep", "mixtral", lambda p, r: (p / "config.json").write_text("[" * 100000 + "]" * 100000), ERROR),
        Case("config-dir", "olmoe", lambda p, r: ((p / "config.json").unlink(), (p / "config.json").mkdir()), ERROR),
    ]


def tensor_cases(rng: random.Random, n: int) -> list[Case]:
    def delete(t, r):
        t.pop(pick(t, r))

    def rename(t, r):
        name = pick(t, r)
        new = r.choice([name + ".x", name.replace("layers.0.", "layers.9."), name.replace("experts.1.", "experts.99."),
                        "model.mystery.weight", name.replace("weight", "bias")])
        t[new if new != name else name + ".x"] = t.pop(name)

    def reshape(t, r):
        name = pick(t, r)
        x = t[name]
        options = [x.reshape(-1), x[..., :-1].contiguous(), x.unsqueeze(0), torch.zeros(0), torch.cat([x, x]),
                   x.t().contiguous()]
        t[name] = r.choice([o for o in options if o.shape != x.shape])

    def retype_bad(t, r):
        name = pick(t, r)
        t[name] = t[name].to(r.choice([torch.int16, torch.int32, torch.uint8, torch.int8, torch.bool, torch.int64,
                                        torch.uint16, torch.float8_e4m3fn]))

    def retype_float(t, r):
        for name in list(t):
            if r.random() < 0.3:
                t[name] = t[name].to(r.choice([torch.float16, torch.bfloat16, torch.float64]))

    def extra(t, r):
        t[f"model.layers.{r.randrange(3)}.extra.weight"] = torch.zeros(3)

    def fused(t, r):  # a fused expert tensor of the wrong rank
        t["model.layers.0.mlp.experts.gate_up_proj"] = torch.zeros(4, 8)

    def nan_fill(t, r):
        name = pick(t, r)
        t[name] = torch.full_like(t[name], float("nan"))

    makers = [(delete, ERROR), (rename, ERROR), (reshape, ERROR), (retype_bad, ERROR), (retype_float, OK),
              (extra, ERROR), (fused, ERROR), (nan_fill, ANY)]
    out = []
    for i in range(n):
        fn, expect = makers[i % len(makers)]
        out.append(Case(f"tensor{i}-{fn.__name__}", rng.choice(FAMILIES), edit_tensors(fn), expect))

    def truncate(p, r):
        f = p / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: r.randrange(len(data))])

    def garble_header(p, r):
        f = p / "model.safetensors"
        data = bytearray(f.read_bytes())
        for _ in range(4):
            data[r.randrange(8, 200)] = r.randrange(256)
        f.write_bytes(bytes(data))

    def huge_header_len(p, r):
        f = p / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes((2**62).to_bytes(8, "little") + data[8:])

    out += [Case(f"file{i}-{fn.__name__}", FAMILIES[i % 4], fn, expect) for i, (fn, expect) in enumerate(
        [(truncate, ERROR), (truncate, ERROR), (truncate, ERROR), (huge_header_len, ERROR),
         (garble_header, ANY), (garble_header, ANY)])]  # a garbled metadata string is harmless
    out.append(Case("file-pickle-only", "olmoe",
                    lambda p, r: ((p / "model.safetensors").rename(p / "pytorch_model.bin")), ERROR))
    return out


def index_cases() -> list[Case]:
    def index(value):
        return lambda p, r: (p / "model.safetensors.index.json").write_text(
            value if isinstance(value, str) else json.dumps(value))

    def full_index(p, r):
        names = load_file(str(p / "model.safetensors"))
        (p / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "model.safetensors" for n in names}}))

    bad = ["[" * 10**5, '{"weight_map": {"a": ' + "1" * 5000 + "}}", {"weight_map": []}, {"weight_map": {}}, {"weight_map": {"a": 5}}, {"weight_map": "model.safetensors"},
           {"weight_map": {"a": "../model.safetensors"}}, {"weight_map": {"a": "missing.safetensors"}}, [], "{",
           {"metadata": {}}, {"weight_map": {"a": ["model.safetensors"]}}]
    out = [Case(f"index{i}-{v!r}", FAMILIES[i % 4], index(v), ERROR) for i, v in enumerate(bad)]
    out.append(Case("index-valid", "qwen2_moe", full_index, OK))
    return out


def tokenizer_cases() -> list[Case]:
    cfg = lambda key, value: lambda p, r: edit_json(p / "tokenizer_config.json", set_key(key, value))  # noqa: E731
    gen = lambda value: lambda p, r: edit_json(p / "generation_config.json", set_key("eos_token_id", value))  # noqa: E731

    def add_tokens(p, r):  # tokens added to the tokenizer, the model not resized (vocab 384)
        def fn(d):
            start = max(t["id"] for t in d["added_tokens"]) + 1
            start = max(start, max(d["model"]["vocab"].values()) + 1)
            for j in range(start, 400):
                d["added_tokens"].append({"id": j, "content": f"<|new{j}|>", "single_word": False, "lstrip": False,
                                          "rstrip": False, "normalized": False, "special": True})
        edit_json(p / "tokenizer.json", fn)

    def truncate_tok(p, r):
        f = p / "tokenizer.json"
        f.write_bytes(f.read_bytes()[:500])

    c = [
        Case("tok-template-int", "mixtral", cfg("chat_template", 5), ERROR),
        Case("tok-template-list-str", "olmoe", cfg("chat_template", ["{{ x }}"]), ERROR),
        Case("tok-template-list-noname", "qwen2_moe", cfg("chat_template", [{"template": "x"}]), ERROR),
        Case("tok-template-named", "qwen3_moe",
             cfg("chat_template", [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ 1 }}"}]),
             OK),
        Case("tok-template-syntax", "mixtral", cfg("chat_template", "{% for %}"), ANY),
        Case("tok-template-raises", "olmoe", cfg("chat_template", "{{ raise_exception('no') }}"), ANY),
        Case("tok-template-typeerror", "qwen2_moe", cfg("chat_template", "{{ messages + 1 }}"), ANY),
        Case("tok-eos-dict", "qwen3_moe", cfg("eos_token", {"id": 1}), ERROR),
        Case("tok-eos-content-int", "mixtral", cfg("eos_token", {"content": 1}), ERROR),
        Case("tok-eos-int", "olmoe", cfg("eos_token", 1), ERROR),
        Case("tok-bos-list", "qwen2_moe", cfg("bos_token", ["<|bos|>"]), ERROR),
        Case("tok-eos-object", "qwen3_moe", cfg("eos_token", {"content": "<|eos|>", "lstrip": False}), OK),
        Case("tok-config-list", "mixtral", lambda p, r: (p / "tokenizer_config.json").write_text("[1]"), ERROR),
        Case("tok-config-junk", "olmoe", lambda p, r: (p / "tokenizer_config.json").write_text("{x"), ERROR),
        Case("tok-config-deep", "qwen2_moe", lambda p, r: (p / "tokenizer_config.json").write_text("[" * 10**5), ERROR),
        Case("tok-json-deep", "qwen3_moe", lambda p, r: (p / "tokenizer.json").write_text("[" * 10**5), ERROR),
        Case("tok-gen-eos-str", "qwen2_moe", gen("x"), ERROR),
        Case("tok-gen-eos-dict", "qwen3_moe", gen({"a": 1}), ERROR),
        Case("tok-gen-eos-neg", "mixtral", gen([-1]), ERROR),
        Case("tok-json-missing", "olmoe", lambda p, r: (p / "tokenizer.json").unlink(), ERROR),
        Case("tok-json-truncated", "qwen2_moe", truncate_tok, ERROR),
        Case("tok-json-junk", "mixtral", lambda p, r: (p / "tokenizer.json").write_bytes(b"\x00\xff"), ERROR),
        Case("tok-added-beyond-vocab", "qwen3_moe", add_tokens, ERROR),
        Case("tok-jinja-binary", "olmoe", lambda p, r: (
            edit_json(p / "tokenizer_config.json", del_key("chat_template")),
            (p / "chat_template.jinja").write_bytes(b"\xff\xfe")), ERROR),
    ]
    return c


def manifest_cases() -> list[Case]:
    def cfg(key, value=None, delete=False):
        def fn(d):
            if delete:
                d["config"].pop(key, None)
            else:
                d["config"][key] = value
        return edit_manifest(fn)

    return [
        Case("manifest-experts-str", "converted", cfg("num_local_experts", "4"), ERROR),
        Case("manifest-top-k-float", "converted", cfg("num_experts_per_tok", 2.5), ERROR),
        Case("manifest-eps-nan", "converted", cfg("rms_norm_eps", float("nan")), ERROR),
        Case("manifest-window-0", "converted", cfg("sliding_window", 0), ERROR),
        Case("manifest-eos-dict", "converted", cfg("eos_token_id", {"a": 1}), ERROR),
        Case("manifest-kv-heads-0", "converted", cfg("num_key_value_heads", 0), ERROR),
        Case("manifest-rope-list", "converted", cfg("rope_parameters", [1, 2]), ERROR),
        Case("manifest-rope-factor", "converted", cfg("rope_parameters", {"rope_type": "linear", "factor": "x"}), ERROR),
        Case("manifest-hidden-missing", "converted", cfg("hidden_size", delete=True), ERROR),
        Case("manifest-vocab-bool", "converted", cfg("vocab_size", True), ERROR),
        Case("manifest-dtype-int8", "converted", edit_manifest(lambda d: d.update(dtype="int8")), ERROR),
        Case("manifest-model-type", "converted", edit_manifest(lambda d: d.update(model_type="olmoe")), ERROR),
        Case("manifest-not-resigned", "converted", edit_manifest(lambda d: d["config"].update(vocab_size=10), False),
             ERROR),
        Case("manifest-unknown-key", "converted", cfg("my_extension", [1, 2]), OK),
        Case("manifest-deep", "converted", lambda p, r: (p / MANIFEST_NAME).write_text("[" * 10**5), ERROR),
        Case("manifest-long-int", "converted", lambda p, r: (p / MANIFEST_NAME).write_text("[" + "7" * 5000 + "]"),
             ERROR),
    ]


def all_cases() -> list[Case]:
    rng = random.Random(SEED)
    cases = (config_cases(rng, 50) + rope_cases() + semantic_cases() + tensor_cases(rng, 24) + index_cases()
             + tokenizer_cases() + manifest_cases())
    ids = [c.id for c in cases]
    assert len(set(ids)) == len(ids)
    return cases


CASES = all_cases()
# An even spread of cases that also run through the CLI, one of them a converted model.
_HF = [c for c in CASES if c.base != "converted"]
CLI_IDS = {c.id for c in _HF[:: len(_HF) // (CLI_SAMPLE - 1)][: CLI_SAMPLE - 1]} | {"manifest-experts-str"}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-bases")
    out = {}
    for family in FAMILIES:
        overrides = {"mlp_only_layers": [1]} if family == "qwen2_moe" else {}
        save_checkpoint(tiny_config(family, **overrides), root / family, tokenizer_dir)
        out[family] = root / family
    proc = run_cli("convert", out["mixtral"], root / "converted")
    assert proc.returncode == 0, proc.stderr
    out["converted"] = root / "converted"
    return out


# ----------------------------------------------------------------------------- the contract


def check_api(path: Path, converted: bool) -> str:
    """Load and generate in-process; returns "ok" or "error" (a clean one)."""
    allowed = (ModelLoadError, StoreError) if converted else (ModelLoadError,)
    try:
        engine = edgemoe.load(path)
    except allowed as e:
        msg = str(e)
        assert "\n" not in msg, msg
        assert str(path) in msg, f"the message does not name the model directory: {msg}"
        return ERROR
    try:
        result = engine.generate("def f(x):", max_tokens=2, ignore_eos=True)
        assert len(result.token_ids) == 2
        if engine.tokenizer.chat_template:
            try:
                engine.chat([{"role": "user", "content": "hi \ud800"}], max_tokens=1)
            except ModelLoadError as e:  # a broken template is reported when a chat needs it
                assert "\n" not in str(e) and str(path) in str(e), str(e)
    finally:
        engine.close()
    return OK


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fuzz_case(case: Case, bases, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(bases[case.base], path)
    case.mutate(path, random.Random(f"{SEED}:{case.id}"))
    outcome = check_api(path, case.base == "converted")
    if case.expect != ANY:
        assert outcome == case.expect, f"expected {case.expect}, got {outcome}"
    if case.id in CLI_IDS:
        proc = run_cli("generate", path, "--prompt", "def", "--max-tokens", "2")
        if outcome == ERROR:
            assert_clean_error(proc, str(path))
        else:
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_fuzz_is_large_enough():
    assert len(CASES) >= 100
    assert sum(c.expect == ERROR for c in CASES) >= 60 and sum(c.expect == OK for c in CASES) >= 5
    assert len(CLI_IDS) == CLI_SAMPLE
