"""Tools through the chat template, with the `openai` client: tiny models whose templates
take tools in the two formats edgemoe parses (Hermes <tool_call> blocks, Mistral
[TOOL_CALLS] as a special token), tool calls parsed back, constrained by tool_choice, and
the parsers on their own."""

import json
import threading

import openai
import pytest

import edgemoe
from edgemoe.errors import InvalidArgument
from edgemoe.server import ToolContext, ToolStreamFilter, Plan, make_server
from edgemoe.tool_calls import parse_tool_calls, template_variables

HERMES = (
    "{{ bos_token }}{% if tools %}<|system|>You may call these functions:\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Answer with <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call><|end|>{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|assistant|>{% for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}<|end|>"
    "{% elif m.role == 'tool' %}<|user|><tool_response>{{ m.content }}</tool_response><|end|>"
    "{% else %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if loop.last and tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% if m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | map(attribute='function') "
    "| list | tojson }}{{ eos_token }}"
    "{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]"
    "{% else %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def tool_model(root, template: str, special: str | None = None):
    import json as _json

    from tokenizers import AddedToken, Tokenizer

    from conftest import save_checkpoint, tiny_config, write_tokenizer

    tok_dir = root / "tok"
    write_tokenizer(tok_dir)
    if special:
        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        tok.add_special_tokens([AddedToken(special, special=True, normalized=False)])
        tok.save(str(tok_dir / "tokenizer.json"))
    cfg = _json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (tok_dir / "tokenizer_config.json").write_text(_json.dumps(cfg))
    out = root / "model"
    save_checkpoint(tiny_config("mixtral", max_position_embeddings=1024), out, tok_dir)
    return edgemoe.load(out)


def start(engine):
    server = make_server(engine, port=0, model_name="tools")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused",
                           max_retries=0, timeout=60)
    return server, client


@pytest.fixture(scope="module")
def hermes(tmp_path_factory):
    engine = tool_model(tmp_path_factory.mktemp("hermes"), HERMES)
    server, client = start(engine)
    yield engine, client
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    engine = tool_model(tmp_path_factory.mktemp("mistral"), MISTRAL, special="[TOOL_CALLS]")
    server, client = start(engine)
    yield engine, client
    server.shutdown()
    server.server_close()


def check_weather_call(call):
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f") and len(args["city"]) <= 8


@pytest.mark.parametrize("model", ["hermes", "mistral"])
def test_required_tool_call_is_parsed_back(request, model):
    engine, client = request.getfixturevalue(model)
    # One call: with parallel calls allowed a random model may go on calling until max_tokens.
    r = client.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER], tool_choice="required",
                                       max_tokens=160, temperature=0, parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) >= 1
    check_weather_call(choice.message.tool_calls[0])


@pytest.mark.parametrize("model", ["hermes", "mistral"])
def test_named_tool_call_streamed(request, model):
    engine, client = request.getfixturevalue(model)
    chunks = list(client.chat.completions.create(
        model="tools", messages=ASK, tools=[TIME, WEATHER], max_tokens=160, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0
    check_weather_call(calls[0])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(not (c.choices and c.choices[0].delta.content) for c in chunks)


def test_tool_results_go_back_through_the_template(hermes):
    engine, client = hermes
    first = client.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=160, temperature=0, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model="tools", messages=history, tools=[WEATHER], max_tokens=4,
                                       temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt = r.usage.prompt_tokens
    assert prompt > first.usage.prompt_tokens  # the call and its result were rendered


def test_tool_choice_none_and_auto(hermes):
    engine, client = hermes
    none = client.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER], tool_choice="none",
                                          max_tokens=4, temperature=0)
    plain = client.chat.completions.create(model="tools", messages=ASK, max_tokens=4, temperature=0)
    assert none.choices[0].message.content == plain.choices[0].message.content  # tools left out of the prompt
    auto = client.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER], max_tokens=4, temperature=0)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens  # tools rendered into the prompt
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER], max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"


def test_parsers():
    content, calls = parse_tool_calls("hermes", 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n'
                                                "</tool_call>\n<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n"
                                                "</tool_call>")
    assert content == "Let me check." and [c.name for c in calls] == ["f", "g"]
    assert json.loads(calls[0].arguments) == {"a": 1}
    assert parse_tool_calls("hermes", "<tool_call>\n{broken\n</tool_call>")[1] == []  # left as content
    content, calls = parse_tool_calls("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": "{\\"x\\": 2}"}]')
    assert content == "" and calls[0].name == "f" and json.loads(calls[0].arguments) == {"x": 2}
    assert parse_tool_calls("mistral", "no calls here") == ("no calls here", [])
    assert "tools" in template_variables(HERMES) and "tools" not in template_variables("{{ messages }}")


class _Tok:
    def token_to_id(self, text):
        return None


def test_stream_filter_holds_back_the_marker():
    tools = ToolContext(_Tok(), "hermes", Plan({}, tools=[WEATHER], tool_choice="auto"))
    f = ToolStreamFilter(tools)
    sent = [f.feed(t, None) for t in ["Sure", ", <tool", "_call>\n{\"name\": \"get_weather\", ",
                                      "\"arguments\": {}}\n</tool_call>"]]
    assert "".join(sent) == "Sure, " and "<" not in "".join(sent)
    rest, calls = f.finish()
    assert rest == "" and calls[0].name == "get_weather"
    g = ToolStreamFilter(tools)
    assert "".join(g.feed(t, None) for t in ["a <t", "able>"]) + g.finish()[0] == "a <table>"


def test_template_without_tools_is_refused(hermes):
    from edgemoe.tool_calls import tool_format

    engine, _ = hermes
    assert tool_format(engine.tokenizer) == "hermes"
    bundled = edgemoe.load()
    with pytest.raises(InvalidArgument, match="no tool support"):
        tool_format(bundled.tokenizer)
