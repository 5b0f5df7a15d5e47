"""OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (with SSE
streaming), /v1/models, /v1/models/{id} and /health.

Every parameter of OpenAI's completions and chat APIs is implemented or refused with a 400
naming it (UNSUPPORTED; unknown fields too, as OpenAI does): log-probabilities with top
alternatives, echo with prompt scoring (max_tokens 0, what lm-eval's loglikelihood tasks
send), batches of prompts (strings or token-id lists), n and best_of, presence/frequency
penalties and logit_bias, stream_options.include_usage, response_format (JSON object or
JSON schema, by constrained decoding: edgemoe.grammar), and tools through the model's
chat template (edgemoe.tool_calls). An unknown model name is a 404.

The engine is injected, so tests drive a real server over HTTP. Requests share the
engine's batch scheduler (edgemoe.batching), as llama-server's parallel slots do: the
engine has `parallel` slots (edgemoe serve --parallel N; each keeps a KV cache of the
context size, all inside the memory budget); every sequence of a request (prompts x n)
is queued at once, a free slot admits the oldest waiting one and prefills it, and all
admitted sequences share each decode step. Sampling, stop strings, max_tokens and
log-probabilities stay per sequence; a sequence that ends, or whose client leaves, frees
its slot for the next one waiting. An encoder-decoder model (Switch Transformers, NLLB-MoE)
answers /v1/completions text-to-text (the prompt is the source; edgemoe.text2text) one
sequence at a time, and chat only through a chat template it has.

Every request gets an HTTP answer: bad input is a 4xx JSON error in OpenAI's shape
({"error": {"message", "type", "param", "code"}}), a bug is a JSON 500 (its traceback goes
to the server log, never to the client), and an error after a stream has started is sent
as a final SSE event. Prompts are tokenized before generation so that prompt plus
max_tokens can be checked against the model's context. A client that disconnects stops
its generation at the next token (or never starts it, if it was still waiting for a
slot); connections time out when idle and their number is capped.

Modules, each by concern:
- parse.py: an OpenAI request body -> a checked Plan (BadRequest names the field); no HTTP.
- outputs.py: what a request's sequences produce (Job, Output) and the tool-call shaping
  (ToolContext, ToolStreamFilter).
- handler.py: the HTTP plumbing (HTTPHandler: routing, body limits, JSON/SSE errors,
  draining, disconnect detection).
- endpoints.py: Handler, the completion and chat endpoints (prompts against the context,
  constrained decoding, sequences in the engine's slots, JSON or SSE answers).
- httpd.py: EdgeMoEServer (the connection cap, the injected engine) and make_server.

Owns the HTTP API and nothing under it: it calls the Engine (edgemoe.api) and the request
helpers beside it (grammar, tool_calls, logprobs), never a model, a provider, the cache or
the store. `edgemoe serve` (cli/serve.py) loads the engine and hands it to make_server.
"""

from __future__ import annotations

from .endpoints import Handler
from .handler import (ALLOW_ALL, DEFAULT_MAX_CONNECTIONS, DEFAULT_TIMEOUT, GET_PATHS, LINGER_S, LOCK_POLL_S, MAX_BODY,
                      MODEL_PREFIX, POST_PATHS, ClientGone, HTTPHandler)
from .httpd import EdgeMoEServer, make_server
from .outputs import Job, Output, score_only, ToolContext, ToolStreamFilter
from .parse import (COMMON, EXTENSIONS, KNOWN, MAX_LOGIT_BIAS, MAX_N, MAX_PROMPTS, MAX_SEQUENCES, MAX_STOP,
                    MAX_STOP_CHARS, MAX_TOKENS_LIMIT, METADATA, MIN_TEMPERATURE, SEED_MAX, SEED_MIN, UNSUPPORTED,
                    BadRequest, Plan, check_known, check_text, parse_logit_bias, parse_messages, parse_options,
                    parse_request, parse_stream)

__all__ = [
    "make_server", "EdgeMoEServer", "Handler", "HTTPHandler", "ClientGone", "BadRequest", "Plan", "Job", "Output",
    "score_only", "ToolContext", "ToolStreamFilter", "parse_request", "parse_options", "parse_stream",
    "parse_messages", "parse_logit_bias", "check_known", "check_text", "UNSUPPORTED", "METADATA", "EXTENSIONS",
    "COMMON", "KNOWN", "MAX_BODY", "MAX_STOP", "MAX_STOP_CHARS", "MIN_TEMPERATURE", "MAX_TOKENS_LIMIT", "SEED_MIN",
    "SEED_MAX", "DEFAULT_TIMEOUT", "DEFAULT_MAX_CONNECTIONS", "LINGER_S", "LOCK_POLL_S", "GET_PATHS",
    "MODEL_PREFIX", "POST_PATHS", "ALLOW_ALL", "MAX_N", "MAX_PROMPTS", "MAX_SEQUENCES", "MAX_LOGIT_BIAS",
]
