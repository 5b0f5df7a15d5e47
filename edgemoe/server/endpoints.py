"""The completion endpoints: /v1/completions and /v1/chat/completions, from a parsed request
to prompts checked against the context, sequences queued in the engine's slots, and the
answer as one JSON object or an SSE stream.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from typing import Any, Iterator

from ..errors import EdgeMoEError, InvalidArgument
from ..grammar import Grammar, json_schema_grammar, lark_grammar
from ..logprobs import chat_logprobs, completion_logprobs
from ..tool_calls import call_grammar, render_chat, template_messages, tool_format
from .handler import ClientGone, HTTPHandler
from .outputs import Job, Output, score_only, ToolContext
from .parse import (MAX_PROMPTS, MAX_SEQUENCES, SEED_MAX, SEED_MIN, BadRequest, Plan, check_text, parse_messages,
                    parse_request)


class Handler(HTTPHandler):
    """The request handler the server runs: HTTPHandler's plumbing plus the endpoints."""

    def _completions(self, body: dict) -> None:
        plan = parse_request(body, chat=False)  # cheap checks before the tokenizer runs
        self._check_model(body.get("model"))
        if plan.echo and plan.logprobs is not None and self.server.engine.text2text is not None:
            raise BadRequest("'echo' with 'logprobs' scores the prompt, to which an encoder-decoder model gives no "
                             "likelihood (its prompt is the source of a text-to-text completion)", "echo")
        jobs = self._prompts(body.get("prompt"), plan)
        self._check_bias(plan)
        self._run(plan, jobs, chat=False, constraint=self._constraint(plan, None))

    def _chat(self, body: dict) -> None:
        plan = parse_request(body, chat=True)
        self._check_model(body.get("model"))
        messages = parse_messages(body)
        engine = self.server.engine
        tools = None
        if plan.tools and plan.tool_choice != "none":
            try:
                tools = ToolContext(engine.tokenizer, tool_format(engine.tokenizer), plan)
                text = render_chat(engine.tokenizer, template_messages(messages), plan.tools)
            except InvalidArgument as e:
                raise BadRequest(str(e), "tools") from None
            ids = engine.tokenizer.encode(text, add_special_tokens=False)  # the template holds any BOS
        else:
            try:
                ids = engine.chat_prompt(template_messages(messages))
            except EdgeMoEError as e:
                raise BadRequest(str(e), "messages") from None
        self._check_bias(plan)
        job = Job(ids, "", self._fit_context(plan.opts["max_tokens"], len(ids), "messages", plan.opts["target_lang"]))
        self._run(plan, [job], chat=True, constraint=self._constraint(plan, tools), tools=tools)

    def _prompts(self, prompt, plan: Plan) -> list["Job"]:
        """The prompts of a completions request: a string, a list of token ids, or a list of
        either (a batch). Each is checked against the context."""
        engine = self.server.engine

        def is_ids(p) -> bool:
            return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

        batch = prompt if isinstance(prompt, list) and prompt and not is_ids(prompt) else [prompt]
        if len(batch) > MAX_PROMPTS:
            raise BadRequest(f"'prompt' may hold at most {MAX_PROMPTS} prompts, got {len(batch)}", "prompt")
        if len(batch) * plan.best_of > MAX_SEQUENCES:
            raise BadRequest(f"{len(batch)} prompts x {plan.best_of} choices is more than {MAX_SEQUENCES} "
                             "sequences in one request", "best_of" if plan.best_of > 1 else "n")
        jobs = []
        for p in batch:
            if is_ids(p):
                if max(p) >= engine.vocab_limit or min(p) < 0:
                    raise BadRequest(f"'prompt' token ids must be in [0, {engine.vocab_limit})", "prompt")
                ids, text = list(p), engine.tokenizer.decode(list(p), skip_special_tokens=False) if plan.echo else ""
            elif isinstance(p, str) and p:
                check_text(p, "prompt")
                ids, text = engine.tokenizer.encode(p), p
            else:
                raise BadRequest("'prompt' must be a non-empty string, a list of token ids, or a list of "
                                 "either", "prompt")
            fit = self._fit_context(plan.opts["max_tokens"], len(ids), "prompt", plan.opts["target_lang"])
            jobs.append(Job(ids, text, fit))
        return jobs

    def _check_bias(self, plan: Plan) -> None:
        bias = plan.opts["logit_bias"]
        if bias and max(bias) >= self.server.engine.vocab_limit:
            raise BadRequest(f"'logit_bias' token id {max(bias)} is not in this model's vocabulary "
                             f"(0 to {self.server.engine.vocab_limit - 1})", "logit_bias")

    def _constraint(self, plan: Plan, tools: "ToolContext | None"):
        """A function returning fresh logits processors for one sequence (constrained
        decoding), or None when the request has no constraint."""
        grammar = None
        try:
            if plan.schema is not None:
                grammar = Grammar(self.server.grammar_tokenizer(), json_schema_grammar(plan.schema),
                                  "response_format")
            elif tools is not None and tools.forced is not None:
                gtok = self.server.grammar_tokenizer()
                grammar = Grammar(gtok, lark_grammar(call_grammar(tools.fmt, tools.forced, gtok,
                                                                  plan.parallel_tool_calls)), "tools")
        except InvalidArgument as e:
            raise BadRequest(str(e), "tools" if plan.schema is None else "response_format") from None
        if grammar is None:
            return None
        if plan.opts["ignore_eos"]:  # a finished grammar allows only end of sequence
            raise BadRequest("'ignore_eos' cannot be combined with constrained output ('response_format' or "
                             "'tool_choice' \"required\" or a named function)", "ignore_eos")
        return lambda: [grammar.processor()]

    def _fit_context(self, max_tokens: int | None, n_prompt: int, param: str, target_lang: str | None = None) -> int:
        """Check prompt + max_tokens against the context (or choose max_tokens to fit)."""
        engine, ctx = self.server.engine, self.server.engine.ctx_size
        if n_prompt < 1:
            raise BadRequest(f"'{param}' encodes to no tokens", param)
        if engine.text2text is not None:
            return self._fit_source(max_tokens, n_prompt, param, target_lang)
        if max_tokens is None:
            room = ctx - n_prompt
            if room < 1:
                raise BadRequest(f"the prompt is {n_prompt} tokens, which leaves no room to generate in the "
                                 f"model's context of {ctx} tokens", param, code="context_length_exceeded")
            max_tokens = min(self.server.default_max_tokens, room)
        try:
            engine.check_context(n_prompt, max_tokens)
        except EdgeMoEError:  # the engine's message speaks to its operator (--ctx-size); this one to the client
            raise BadRequest(f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) is more than the model's "
                             f"context of {ctx} tokens; shorten the prompt or lower max_tokens",
                             "max_tokens" if n_prompt < ctx else param, code="context_length_exceeded") from None
        return max_tokens

    def _fit_source(self, max_tokens: int | None, n_prompt: int, param: str, target_lang: str | None) -> int:
        """_fit_context for an encoder-decoder model: the prompt (the source) and the
        target each fit the context (edgemoe.text2text; a target language code is the
        decoder prompt's second token)."""
        t2t, ctx = self.server.engine.text2text, self.server.engine.ctx_size
        try:
            decoder = len(t2t.decoder_prompt(target_lang))
        except InvalidArgument as e:
            raise BadRequest(str(e), "target_lang") from None
        if n_prompt > ctx:
            raise BadRequest(f"the prompt (the source of this encoder-decoder model) is {n_prompt} tokens, more than "
                             f"the model's context of {ctx} tokens; shorten it", param, code="context_length_exceeded")
        if max_tokens is None:
            return t2t.room(n_prompt, self.server.default_max_tokens, decoder)
        if max_tokens > t2t.max_target(decoder):
            raise BadRequest(f"max_tokens ({max_tokens}) is more than the {t2t.max_target(decoder)} target tokens the "
                             f"model's context of {ctx} tokens holds; lower max_tokens", "max_tokens",
                             code="context_length_exceeded")
        return max_tokens

    def _sequences(self, plan: Plan, jobs: list["Job"], constraint) -> Iterator[tuple[int, "Job", Iterator]]:
        """(prompt index, job, responses) for every sequence, in order: each prompt's
        best_of samples, seeds seed, seed + 1, ..."""
        engine = self.server.engine
        # best_of ranks samples by their log-probability: ask for it even when the client does not.
        logprobs = plan.logprobs if plan.logprobs is not None or plan.best_of == plan.n else 0
        for i, job in enumerate(jobs):
            for j in range(plan.best_of):
                opts = dict(plan.opts, max_tokens=job.max_tokens)
                if opts["seed"] is not None:
                    opts["seed"] = (opts["seed"] - SEED_MIN + j) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN
                if job.max_tokens == 0 and plan.logprobs is None:
                    yield i, job, iter([score_only(job)])  # echo of the prompt alone: nothing to run
                    continue
                yield i, job, engine.stream(job.ids, **opts, logprobs=logprobs,
                                            prompt_logprobs=plan.echo and plan.logprobs is not None,
                                            logits_processors=constraint() if constraint else (),
                                            abort=self._abort_if_gone)

    def _run(self, plan: Plan, jobs: list["Job"], chat: bool, constraint, tools: "ToolContext | None" = None) -> None:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if self.client_gone():
            raise ClientGone()
        streams: list[tuple[int, "Job", Iterator]] = []
        try:
            # Every sequence is queued now: they run side by side in the engine's slots, and
            # are read in order. Engine.stream validates its options when called, and the first
            # response needs the prefill: both happen before any header, so their errors are
            # plain JSON.
            streams.extend(self._sequences(plan, jobs, constraint))
            i, job, current = streams[0]
            first = next(current, None)
            if first is None:
                raise RuntimeError("the engine produced no response")

            def runs() -> Iterator[tuple[int, "Job", Iterator]]:
                yield i, job, itertools.chain([first], current)
                yield from streams[1:]

            if plan.stream:
                self._stream(rid, chat, plan, runs(), tools)
            else:
                self._complete(rid, chat, plan, runs(), tools)
        finally:
            for _, _, responses in streams:
                close = getattr(responses, "close", None)
                if close is not None:
                    close()  # frees the slot (or the place in the queue) if we left early

    def _abort_if_gone(self) -> None:
        """Called while a sequence waits for a slot or a token: give up if the client left."""
        if self.client_gone():
            raise ClientGone()

    def _tokens(self, responses: Iterator) -> Iterator:
        """The responses, stopping (ClientGone) when the client disconnects between tokens."""
        for r in responses:
            yield r
            if r.finish_reason is None and self.client_gone():
                raise ClientGone()

    def _usage(self, jobs_seen: dict, generated: int) -> dict:
        prompt = sum(jobs_seen.values())
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    def _completion_logprobs(self, job: "Job", out: "Output", plan: Plan) -> dict | None:
        if plan.logprobs is None:
            return None
        tt = self.server.token_text
        if plan.echo:
            entries = (out.prompt_entries or [None] * len(job.ids)) + out.entries
            return completion_logprobs(tt, entries, job.ids + out.tokens)
        return completion_logprobs(tt, out.entries, out.tokens, offset=len(job.text))

    def _complete(self, rid: str, chat: bool, plan: Plan, runs: Iterator, tools: "ToolContext | None") -> None:
        per_prompt: dict[int, list[Output]] = {}
        prompts: dict[int, int] = {}
        generated, stats = 0, None
        for i, job, responses in runs:
            out = Output(i, job)
            for r in self._tokens(responses):
                out.add(r)
            per_prompt.setdefault(i, []).append(out)
            prompts[i] = len(job.ids)
            generated += out.generated
            stats = out.stats
        choices = []
        for i in sorted(per_prompt):
            outs = per_prompt[i]
            if plan.best_of > plan.n:  # the n samples the model finds likeliest
                outs = sorted(outs, key=lambda o: -sum(e.logprob for e in o.entries))[: plan.n]
            for j, out in enumerate(outs):
                choice: dict[str, Any] = {"index": i * plan.n + j, "finish_reason": out.finish_reason}
                if chat:
                    message: dict[str, Any] = {"role": "assistant", "content": out.text}
                    if tools is not None:
                        content, calls = tools.parse(out.pieces)
                        if calls:
                            message = {"role": "assistant", "content": content or None,
                                       "tool_calls": [c.to_openai() for c in calls]}
                            choice["finish_reason"] = "tool_calls"
                    choice["message"] = message
                    choice["logprobs"] = (None if plan.logprobs is None else
                                          {"content": chat_logprobs(self.server.token_text, out.entries),
                                           "refusal": None})
                else:
                    choice["text"] = (out.job.text if plan.echo else "") + out.text
                    choice["logprobs"] = self._completion_logprobs(out.job, out, plan)
                choices.append(choice)
        payload = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                   "model": self.server.model_name, "choices": choices, "usage": self._usage(prompts, generated)}
        if stats is not None:
            payload["stats"] = stats.to_dict()  # of the last sequence
        self._send_json(200, payload)

    def _stream(self, rid: str, chat: bool, plan: Plan, runs: Iterator, tools: "ToolContext | None") -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self._sse = True
        self.close_connection = True
        created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"
        tt = self.server.token_text

        def send(chunk_choices: list, **extra) -> None:
            chunk = {"id": rid, "object": obj, "created": created, "model": self.server.model_name,
                     "choices": chunk_choices, **extra}
            if plan.include_usage and "usage" not in extra:
                chunk["usage"] = None
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        def choice(index: int, text: str | None, finish: str | None, entries: list, job: "Job",
                   tokens: list[int], offset: int, delta: dict | None = None) -> dict:
            if chat:
                if delta is None:
                    delta = {"content": text} if text else {}
                lp = None if plan.logprobs is None else {"content": chat_logprobs(tt, entries), "refusal": None}
                return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            lp = None if plan.logprobs is None else completion_logprobs(tt, entries, tokens, offset)
            return {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}

        try:
            prompts: dict[int, int] = {}
            generated, count = 0, {}
            for i, job, responses in runs:
                j = count.get(i, 0)
                count[i] = j + 1
                index = i * plan.n + j
                prompts[i] = len(job.ids)
                offset = 0
                if chat:
                    send([choice(index, None, None, [], job, [], 0, delta={"role": "assistant", "content": ""})])
                elif plan.echo:
                    first = next(responses)
                    responses = itertools.chain([first], responses)
                    send([choice(index, job.text, None, first.prompt_logprobs or [None] * len(job.ids), job,
                                 job.ids, 0)])
                    offset = len(job.text)
                else:
                    offset = len(job.text)
                filt = tools.stream_filter() if tools is not None else None
                entries, tokens, last = [], [], None
                for r in self._tokens(responses):
                    last = r
                    if r.logprobs is not None:
                        entries.append(r.logprobs)
                        tokens.append(r.token)
                    text = r.text
                    if filt is not None:
                        text = filt.feed(r.text, r.token)
                    if text or (r.finish_reason and filt is None):
                        send([choice(index, text, r.finish_reason if filt is None else None, entries, job, tokens,
                                     offset)])
                        offset += sum(len(tt.text(t)) for t in tokens)
                        entries, tokens = [], []
                if filt is not None:
                    rest, calls = filt.finish()
                    finish = last.finish_reason if last is not None else "stop"
                    if rest or entries:
                        send([choice(index, rest, None, entries, job, tokens, offset)])
                    if calls:
                        send([choice(index, None, None, [], job, [], 0,
                                     delta={"tool_calls": [c.to_openai(k) for k, c in enumerate(calls)]})])
                        finish = "tool_calls"
                    send([choice(index, None, finish, [], job, [], 0)])
                if last is not None:
                    generated += last.stats.generated_tokens
            if plan.include_usage:
                send([], usage=self._usage(prompts, generated))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (ConnectionError, TimeoutError):
            raise ClientGone() from None  # the client went away or stopped reading
