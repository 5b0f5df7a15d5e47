"""What a request's sequences produce, gathered for the answer: a prompt to run (Job), one
generated sequence (Output), and a chat request's tools (ToolContext: the template's call
format; ToolStreamFilter: streamed content up to the tool-call marker).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..generate import GenerationResponse, GenerationStats, TokenLogprob, _hold_back
from ..tool_calls import FORMATS, ToolCall, parse_tool_calls
from .parse import Plan


@dataclass
class Job:
    """One prompt of a request."""

    ids: list[int]
    text: str  # the prompt as text (what echo returns)
    max_tokens: int


def score_only(job: Job) -> GenerationResponse:
    """The answer for echo with max_tokens 0 and no log-probabilities: nothing to run."""
    return GenerationResponse("", None, "length", GenerationStats(prompt_tokens=len(job.ids)))


class Output:
    """One generated sequence, gathered from its responses."""

    def __init__(self, prompt: int, job: Job):
        self.prompt, self.job = prompt, job
        self.pieces: list[tuple[str, int | None]] = []  # (text, token) per response
        self.tokens: list[int] = []  # tokens with log-probabilities (all, when they were asked for)
        self.entries: list[TokenLogprob] = []
        self.prompt_entries: list[TokenLogprob | None] | None = None
        self.finish_reason, self.stats, self.generated = None, None, 0

    def add(self, r: GenerationResponse) -> None:
        self.pieces.append((r.text, r.token))
        if r.logprobs is not None:
            self.entries.append(r.logprobs)
            self.tokens.append(r.token)
        if r.prompt_logprobs is not None:
            self.prompt_entries = r.prompt_logprobs
        if r.finish_reason is not None:
            self.finish_reason, self.stats, self.generated = r.finish_reason, r.stats, r.stats.generated_tokens

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)


class ToolContext:
    """Tools of a chat request: the template's call format and, for tool_choice "required"
    or a named function, the tools the output is constrained to call."""

    def __init__(self, tokenizer, fmt: str, plan: Plan):
        self.fmt = fmt
        self.marker = FORMATS[fmt][0]
        # A marker that is a special token vanishes from decoded text: it is put back by id.
        tid = tokenizer.token_to_id(self.marker)
        self.marker_id = tid if tid is not None and tokenizer.decode([tid]) == "" else None
        choice = plan.tool_choice
        self.forced = plan.tools if choice == "required" else [choice] if isinstance(choice, dict) else None

    def piece(self, text: str, token: int | None) -> str:
        return self.marker + text if token is not None and token == self.marker_id else text

    def parse(self, pieces: list[tuple[str, int | None]]) -> tuple[str, list[ToolCall]]:
        return parse_tool_calls(self.fmt, "".join(self.piece(t, k) for t, k in pieces))

    def stream_filter(self) -> "ToolStreamFilter":
        return ToolStreamFilter(self)


class ToolStreamFilter:
    """Streams content until the tool-call marker appears (holding back text that may
    begin it), then buffers the rest to parse as calls at the end."""

    def __init__(self, tools: ToolContext):
        self.tools = tools
        self.raw = ""  # all output, markers included
        self.sent = 0  # characters of raw already streamed as content
        self.buffering = tools.forced is not None  # constrained output is calls only

    def feed(self, text: str, token: int | None) -> str:
        self.raw += self.tools.piece(text, token)
        if self.buffering:
            return ""
        at = self.raw.find(self.tools.marker, self.sent)
        if at >= 0:
            self.buffering = True
            end = at
        else:
            end = len(self.raw) - _hold_back(self.raw[self.sent:], [self.tools.marker])
        out, self.sent = self.raw[self.sent : end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to send, parsed calls)."""
        _, calls = parse_tool_calls(self.tools.fmt, self.raw)
        if calls:
            return "", calls
        rest, self.sent = self.raw[self.sent :], len(self.raw)
        return rest, []
