"""Generation layers: stop conditions, streaming text, stats and prompt-cache reuse."""

from types import SimpleNamespace

import pytest
import torch

import edgemoe
from edgemoe.generate import PromptCache, generate_step, stream_generate
from edgemoe.models.attention import KVCache
from edgemoe.tokenizer import Tokenizer


class ScriptedModel:
    """Stands in for a Transformer: after the prompt it predicts `script` token by token,
    and counts how many positions it was asked to process."""

    def __init__(self, prompt_len: int, script: list[int], vocab: int):
        self.prompt_len, self.script, self.vocab = prompt_len, script, vocab
        self.args = SimpleNamespace(eos_ids=[])
        self.positions_processed = 0

    def make_cache(self, capacity=None):
        return [KVCache(capacity)]

    def moe_blocks(self):
        return iter(())

    def __call__(self, ids, cache, last_only=False):
        T = ids.shape[1]
        cache[0].offset += T
        self.positions_processed += T
        nxt = self.script[max(0, min(cache[0].offset - self.prompt_len, len(self.script) - 1))]  # (chunked prefill)
        logits = torch.full((1, 1 if last_only else T, self.vocab), -10.0)
        logits[0, -1, nxt] = 10.0
        return logits


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer(tokenizer_dir)


def run(tok, script_text, **kw):
    prompt = tok.encode("def f():")
    script = tok.encode(script_text, add_special_tokens=False) + [tok.token_to_id("<|eos|>")]
    model = ScriptedModel(len(prompt), script, tok.vocab_size)
    responses = list(stream_generate(model, tok, prompt, **kw))
    return "".join(r.text for r in responses), responses, script


def test_stops_at_eos(tok):
    text, responses, script = run(tok, " return 1", max_tokens=50)
    assert text == " return 1"
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].stats.generated_tokens == len(script)


def test_ignore_eos_runs_to_max_tokens(tok):
    text, responses, _ = run(tok, " x", max_tokens=7, ignore_eos=True)
    assert responses[-1].finish_reason == "length"
    assert responses[-1].stats.generated_tokens == 7


def test_max_tokens(tok):
    _, responses, _ = run(tok, " return some_long_value + another_value", max_tokens=3)
    assert responses[-1].finish_reason == "length"
    assert len([r for r in responses if r.token is not None]) == 3


def test_stop_string_cuts_text_and_is_never_streamed(tok):
    text, responses, _ = run(tok, " alpha STOP beta", max_tokens=50, stop=["STOP"])
    assert text == " alpha "
    assert responses[-1].finish_reason == "stop"
    assert all("ST" not in r.text for r in responses)


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tok):
    text, _, _ = run(tok, " a ST b", max_tokens=50, stop=["STOP"])
    assert text == " a ST b"


def test_stream_never_yields_broken_utf8(tok):
    text, responses, _ = run(tok, " 你好 ✓ wörld", max_tokens=50)
    assert text == " 你好 ✓ wörld"
    assert all("\ufffd" not in r.text for r in responses)


def test_prompt_cache_prefills_only_the_new_suffix(tok):
    prompt = tok.encode("def f(): return 1")
    model = ScriptedModel(len(prompt), [5, 6, 7], tok.vocab_size)
    cache = PromptCache(model)
    list(generate_step(model, prompt, max_tokens=3, cache=cache))
    first = model.positions_processed
    assert first == len(prompt) + 2  # prompt + two decode steps (the third token needs no forward)
    follow = prompt + [5, 6, 7] + tok.encode(" more", add_special_tokens=False)
    model.prompt_len = len(follow)
    list(generate_step(model, follow, max_tokens=1, cache=cache))
    # the cache held prompt + 5 + 6, so only 7 and " more" are new
    assert model.positions_processed - first == len(follow) - (len(prompt) + 2)


def test_the_same_prompt_again_runs_no_forward_and_gets_the_same_logits(tok):
    """A repeated prompt takes the first request's cached last logits (no one-position
    recompute, whose sums would run in another order); a shorter prefix of the cache has
    no logits kept, so its last token is recomputed."""
    prompt = tok.encode("def f(): return 1")
    model = ScriptedModel(len(prompt), [5, 6, 7], tok.vocab_size)
    cache = PromptCache(model)
    first = list(generate_step(model, prompt, max_tokens=3, cache=cache, logprobs=True))
    done = model.positions_processed
    again = list(generate_step(model, prompt, max_tokens=3, cache=cache, logprobs=True))
    assert model.positions_processed - done == 2  # the two decode steps only: no prompt position
    assert [t for t, _ in again] == [t for t, _ in first]
    assert torch.equal(again[0][1], first[0][1])  # the first token's distribution, bit for bit
    done = model.positions_processed
    model.prompt_len = len(prompt) - 2
    list(generate_step(model, prompt[:-2], max_tokens=1, cache=cache))
    assert model.positions_processed - done == 1  # a cached prefix without kept logits: its last token again


def test_real_model_stream_equals_generate_and_reports_stats(tiny_mixtral):
    engine = edgemoe.load(tiny_mixtral)
    res = engine.generate("def add(a, b):", max_tokens=12, ignore_eos=True)
    streamed = list(engine.stream("def add(a, b):", max_tokens=12, ignore_eos=True))
    assert "".join(r.text for r in streamed) == res.text
    assert [r.token for r in streamed if r.token is not None] == res.token_ids
    assert len(res.token_ids) == 12
    s = res.stats.to_dict()
    assert s["prompt_tokens"] == len(engine.tokenizer.encode("def add(a, b):"))
    assert s["generated_tokens"] == 12 and s["peak_rss_bytes"] > 0 and s["decode_s"] > 0


def test_prompt_cache_gives_same_tokens_as_fresh_run(tiny_mixtral):
    engine = edgemoe.load(tiny_mixtral)
    cache = engine.new_cache()
    first = engine.generate("def add(a, b):", max_tokens=6, ignore_eos=True, cache=cache)
    prompt2 = engine.tokenizer.encode("def add(a, b):") + first.token_ids + engine.tokenizer.encode(
        "\nclass", add_special_tokens=False)
    cached = engine.generate(prompt2, max_tokens=8, ignore_eos=True, cache=cache)
    fresh = engine.generate(prompt2, max_tokens=8, ignore_eos=True)
    assert cached.token_ids == fresh.token_ids


def test_seeded_sampling_is_reproducible(tiny_mixtral):
    engine = edgemoe.load(tiny_mixtral)
    a = engine.generate("x", max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)
    b = engine.generate("x", max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_chat_uses_template(tiny_mixtral):
    engine = edgemoe.load(tiny_mixtral)
    ids = engine.chat_prompt([{"role": "user", "content": "hi"}])
    assert engine.tokenizer.decode(ids, skip_special_tokens=False) == "<|bos|><|user|>hi<|end|><|assistant|>"
    assert len(engine.chat([{"role": "user", "content": "hi"}], max_tokens=3, ignore_eos=True).token_ids) == 3


def test_thread_count_choice(tiny_mixtral):
    from edgemoe.api import SMALL_MODEL_BYTES, decode_bytes_per_token
    from edgemoe.errors import InvalidArgument

    engine = edgemoe.load(tiny_mixtral)
    assert decode_bytes_per_token(engine.model) < SMALL_MODEL_BYTES
    assert engine.info["threads"] == 1 == torch.get_num_threads()
    assert edgemoe.load(tiny_mixtral, threads=2).info["threads"] == 2
    with pytest.raises(InvalidArgument):
        edgemoe.load(tiny_mixtral, threads=0)
    torch.set_num_threads(1)
    # Quantized resident layers hold their weights as buffers (Int8Linear, Int4Linear): counted too.
    before = decode_bytes_per_token(engine.model)
    engine.model.layers[0].attn.register_buffer("codes", torch.zeros(12345, dtype=torch.uint8))
    assert decode_bytes_per_token(engine.model) == before + 12345


def test_generate_step_yields_the_models_logprobs(tok):
    prompt = tok.encode("def f():")
    model = ScriptedModel(len(prompt), [5, 6, 7], tok.vocab_size)
    steps = list(generate_step(model, prompt, max_tokens=3, logprobs=True))
    assert [t for t, _ in steps] == [5, 6, 7]
    for token, lp in steps:
        assert lp.shape == (tok.vocab_size,) and torch.isclose(lp.exp().sum(), torch.tensor(1.0))
        assert int(lp.argmax()) == token
    model = ScriptedModel(len(prompt), [5, 6, 7], tok.vocab_size)
    assert list(generate_step(model, prompt, max_tokens=3)) == [5, 6, 7]  # plain ids without the option


def test_prompt_logits_cover_every_position_and_skip_the_cache(tok):
    prompt = tok.encode("def f(): return 1")
    model = ScriptedModel(len(prompt), [5], tok.vocab_size)
    cache = PromptCache(model)
    list(generate_step(model, prompt, max_tokens=1, cache=cache))
    seen = []
    model.positions_processed = 0
    list(generate_step(model, prompt, max_tokens=1, cache=cache, prefill_chunk=3,
                       prompt_logits=lambda pos, logits: seen.append((pos, logits.shape[0]))))
    assert model.positions_processed == len(prompt)  # the whole prompt again: a cached prefix has no logits
    assert [p for p, _ in seen] == list(range(0, len(prompt), 3)) and sum(n for _, n in seen) == len(prompt)


def test_stream_generate_scores_a_prompt_with_max_tokens_zero(tok):
    prompt = tok.encode("def f():")
    model = ScriptedModel(len(prompt), [5], tok.vocab_size)
    responses = list(stream_generate(model, tok, prompt, max_tokens=0, prompt_logprobs=True, logprobs=2))
    assert len(responses) == 1 and responses[0].finish_reason == "length" and responses[0].token is None
    scored = responses[0].prompt_logprobs
    assert len(scored) == len(prompt) and scored[0] is None
    assert [e.token for e in scored[1:]] == prompt[1:] and all(len(e.top) == 2 for e in scored[1:])
    assert responses[0].stats.generated_tokens == 0


def test_stream_generate_attaches_logprobs_to_each_token(tok):
    _, responses, script = run(tok, " return 1", max_tokens=50, logprobs=3)
    tokens = [r for r in responses if r.token is not None]
    assert [r.logprobs.token for r in tokens] == [r.token for r in tokens]
    for r in tokens:
        assert len(r.logprobs.top) == 3 and r.logprobs.top[0] == (r.token, r.logprobs.logprob)
        assert [lp for _, lp in r.logprobs.top] == sorted((lp for _, lp in r.logprobs.top), reverse=True)
    assert all(r.prompt_logprobs is None for r in responses)


def test_engine_scoring_matches_generation(tiny_mixtral):
    engine = edgemoe.load(tiny_mixtral)
    gen = list(engine.stream("def add(a, b):", max_tokens=5, ignore_eos=True, logprobs=0))
    ids = engine.tokenize("def add(a, b):") + [r.token for r in gen if r.token is not None]
    scored = next(iter(engine.stream(ids, max_tokens=0, prompt_logprobs=True))).prompt_logprobs
    expected = [r.logprobs.logprob for r in gen if r.logprobs is not None]
    assert [e.logprob for e in scored[-5:]] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(edgemoe.errors.InvalidArgument):
        engine.stream("x", max_tokens=0)  # without scoring there is nothing to do
    with pytest.raises(edgemoe.errors.InvalidArgument):
        engine.stream("x", max_tokens=1, logprobs=21)
