"""The server driven by the official `openai` Python client: every parameter of the
completions and chat APIs that edgemoe implements, streaming and not, and the refusals of
those it does not. Log-probabilities are checked against transformers on the same weights."""

import json
import threading

import openai
import pytest
import torch

import edgemoe
from edgemoe.server import make_server

PROMPT = "def fibonacci(n):\n    if n < 2:"


def serve(engine, name="tiny"):
    server = make_server(engine, port=0, model_name=name)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused",
                           max_retries=0, timeout=60)
    return server, client


@pytest.fixture(scope="module")
def engine():
    return edgemoe.load(dtype="float32")  # float32: log-probabilities compare tightly with transformers


@pytest.fixture(scope="module")
def client(engine):
    server, client = serve(engine)
    yield client
    server.shutdown()
    server.server_close()


def chunks_of(stream):
    return list(stream)


# -- models


def test_models_list_retrieve_and_unknown_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=1)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


# -- log-probabilities


def test_completion_logprobs_match_transformers(client, engine):
    """echo + max_tokens 0 scores the prompt (what lm-eval sends); each token's log-probability
    equals transformers' log-softmax at the previous position, and the top alternatives are
    transformers' top-k."""
    import transformers as tf

    ids = engine.tokenize(PROMPT)
    r = client.completions.create(model="tiny", prompt=[ids], max_tokens=0, echo=True, logprobs=3, temperature=0)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(ids) and r.usage.completion_tokens == 0
    assert "".join(lp.tokens) == PROMPT and r.choices[0].text == PROMPT
    hf = tf.AutoModelForCausalLM.from_pretrained(str(engine.path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)  # (T, V)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-3)
        top = torch.topk(ref[i - 1], 3)
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=1e-3)


def test_generated_logprobs_agree_with_scoring_and_stream(client, engine):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 6
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert value == max(top.values())  # greedy: the chosen token is the most likely
    assert lp.text_offset[0] == len(PROMPT)
    # Scoring prompt + completion gives the same numbers as generating it.
    gen = r.choices[0].text
    ids = engine.tokenize(PROMPT)
    full = ids + engine.generate(PROMPT, max_tokens=6, ignore_eos=True).token_ids
    s = client.completions.create(model="tiny", prompt=full, max_tokens=0, echo=True, logprobs=0)
    assert s.choices[0].logprobs.token_logprobs[len(ids):] == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert s.choices[0].text == PROMPT + gen
    chunks = chunks_of(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                                 logprobs=2, stream=True))
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == gen


def test_echo_streamed_and_with_generation(client, engine):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, echo=True, logprobs=1, temperature=0)
    text = r.choices[0].text
    assert text.startswith(PROMPT) and len(r.choices[0].logprobs.tokens) == len(engine.tokenize(PROMPT)) + 3
    chunks = chunks_of(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, echo=True, logprobs=1,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].text == PROMPT
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True)
    assert plain.choices[0].text == PROMPT and plain.choices[0].logprobs is None


def test_chat_logprobs_streaming_and_not(client):
    msgs = [{"role": "user", "content": "Write a function"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == c.logprob
        assert bytes(c.bytes).decode("utf-8", "replace") == c.token
    chunks = chunks_of(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0,
                                                      logprobs=True, top_logprobs=3, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-6)
    no_top = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, logprobs=True)
    assert all(c.top_logprobs == [] for c in no_top.choices[0].logprobs.content)


# -- batches, n, best_of


def test_batched_prompts_strings_and_token_ids(client, engine):
    prompts = ["import os", "class A:", "x = 1"]
    single = [client.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0).choices[0].text
              for p in prompts]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2] and [c.text for c in r.choices] == single
    ids = [engine.tokenize(p) for p in prompts]
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    assert [c.text for c in r2.choices] == single
    assert r2.usage.prompt_tokens == sum(len(i) for i in ids)
    chunks = chunks_of(client.completions.create(model="tiny", prompt=prompts, max_tokens=4, temperature=0,
                                                 stream=True))
    for k, text in enumerate(single):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == k) == text


def test_n_choices_seeded_and_streamed(client):
    kw = dict(model="tiny", prompt="def", max_tokens=8, temperature=1.0, seed=11)
    a = client.completions.create(n=3, **kw)
    b = client.completions.create(n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # reproducible
    assert len({c.text for c in a.choices}) > 1  # the samples differ from one another
    assert 3 <= a.usage.completion_tokens <= 24 and a.usage.prompt_tokens == b.usage.prompt_tokens
    msgs = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="tiny", messages=msgs, n=2, max_tokens=4, temperature=1.0, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]
    chunks = chunks_of(client.chat.completions.create(model="tiny", messages=msgs, n=2, max_tokens=4,
                                                      temperature=1.0, seed=3, stream=True))
    for k in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == k)
        assert text == chat.choices[k].message.content


def test_best_of_returns_the_likeliest(client):
    kw = dict(model="tiny", prompt="def", max_tokens=6, temperature=1.0, seed=5, logprobs=0)
    every = client.completions.create(n=4, **kw).choices
    best = client.completions.create(n=1, best_of=4, **kw).choices
    totals = [sum(c.logprobs.token_logprobs) for c in every]
    assert len(best) == 1 and best[0].text == every[totals.index(max(totals))].text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", n=2, best_of=1)


# -- penalties and logit_bias


def test_penalties_change_repetition(client, engine):
    kw = dict(model="tiny", prompt="x = [1, 1, 1, 1,", max_tokens=24, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    penalized = client.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **kw).choices[0].text

    def repeats(text):
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        return len(ids) - len(set(ids))

    assert penalized != plain and repeats(penalized) < repeats(plain)
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="x", max_tokens=1, **{name: 5})
        assert e.value.body["param"] == name


def test_logit_bias_forces_and_bans(client, engine):
    target = engine.tokenizer.encode(" banana", add_special_tokens=False)[0]
    r = client.completions.create(model="tiny", prompt="def", max_tokens=3, temperature=0,
                                  logit_bias={str(target): 100})
    assert engine.tokenizer.encode(r.choices[0].text, add_special_tokens=False)[:1] == [target]
    greedy = engine.generate("def", max_tokens=1).token_ids[0]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                          temperature=0, logit_bias={str(greedy): -100}, logprobs=True)
    assert chat.choices[0].logprobs.content[0].token != engine.tokenizer.decode([greedy])
    r = client.completions.create(model="tiny", prompt="def", max_tokens=1, temperature=0,
                                  logit_bias={str(greedy): -100})
    assert engine.tokenizer.encode(r.choices[0].text, add_special_tokens=False)[:1] != [greedy]


# -- streaming usage


def test_stream_include_usage(client):
    chunks = chunks_of(client.completions.create(model="tiny", prompt="def", max_tokens=4, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    chat = chunks_of(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=3, temperature=0, stream=True,
                                                    stream_options={"include_usage": True}))
    assert chat[-1].usage.total_tokens == chat[-1].usage.prompt_tokens + chat[-1].usage.completion_tokens


# -- response_format

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                   "kind": {"enum": ["a", "b"]}},
    "required": ["name", "ok", "kind"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_is_valid(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Give me a thing as JSON"}], max_tokens=60,
              temperature=0, response_format=fmt)
    if stream:
        chunks = chunks_of(client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client.chat.completions.create(**kw)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "stop"
    value = json.loads(text)
    assert set(value) == {"name", "ok", "kind"} and isinstance(value["ok"], bool) and value["kind"] in ("a", "b")
    assert isinstance(value["name"], str) and len(value["name"]) <= 6


def test_json_object_and_completions_response_format(client, engine):
    # A random-ish tiny model could wander inside a string for ever: favour closing the object.
    close = engine.tokenizer.encode("}", add_special_tokens=False)[0]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                       max_tokens=20, temperature=0, response_format={"type": "json_object"},
                                       logit_bias={str(close): 30})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model="tiny", prompt="data = ", max_tokens=60, temperature=0,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "t", "schema": SCHEMA}}})
    assert set(json.loads(r.choices[0].text)) == {"name", "ok", "kind"}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "t", "schema": {"type": "nope"}}})
    assert e.value.body["param"] == "response_format"


# -- refusals


@pytest.mark.parametrize("kwargs,param", [
    (dict(suffix="end"), "suffix"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate"),
    (dict(logprobs=21), "logprobs"),
    (dict(n=17), "n"),
])
def test_unsupported_completion_parameters_are_refused(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=1, **kwargs)
    assert e.value.body["param"] == param


@pytest.mark.parametrize("kwargs,param", [
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),  # no tool support in the template
    (dict(functions=[{"name": "f"}]), "functions"),
    (dict(audio={"voice": "alloy", "format": "wav"}), "audio"),
    (dict(reasoning_effort="high"), "reasoning_effort"),
    (dict(store=True), "store"),
    (dict(top_logprobs=2), "top_logprobs"),
])
def test_unsupported_chat_parameters_are_refused(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                       **kwargs)
    assert e.value.body["param"] == param


def test_metadata_parameters_are_accepted(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                       user="u1", metadata={"k": "v"}, service_tier="auto", store=False,
                                       parallel_tool_calls=True, tool_choice="none")
    assert r.choices[0].finish_reason in ("stop", "length")
