"""`GenerateOptions`: the options of one generation call (Engine.stream, generate, chat,
generate_batch), in one typed object. The engine checks them against the prompt and the
model when the call starts (api.Engine._prepare, sample.py), before anything runs; the
docstring of Engine.stream lists them from the fields below.

Adding an option: a field here with its `doc`, and its use in Engine._prepare. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .runtime.config import from_keywords


def _doc(text: str, default=None):
    return field(default=default, metadata={"doc": " ".join(text.split())})


@dataclass(frozen=True)
class GenerateOptions:
    """How one call generates; every field has the default a call gets without it."""

    max_tokens: int | None = _doc("most tokens to generate; None: 256, or fewer if the context is short.")
    temperature: float = _doc("sampling temperature; 0 is greedy.", 0.0)
    top_p: float = _doc("nucleus sampling mass (1.0: off).", 1.0)
    top_k: int = _doc("keep only the k most likely tokens (0: off).", 0)
    min_p: float = _doc("drop tokens below min_p x the top probability (0: off).", 0.0)
    repetition_penalty: float = _doc("penalty for tokens already in the context (1.0: off).", 1.0)
    seed: int | None = _doc("random seed for sampling (None: a fresh one).")
    stop: str | Sequence[str] = _doc("a stop string or a list of them: generation ends before one.", ())
    ignore_eos: bool = _doc("keep generating past the end-of-sequence token.", False)
    cache: object = _doc(
        "a PromptCache (Engine.new_cache) whose prefix shared with the prompt is reused; the call then runs alone, "
        "outside the batch scheduler.")
    presence_penalty: float = _doc("OpenAI's presence penalty (-2 to 2) over generated tokens.", 0.0)
    frequency_penalty: float = _doc("OpenAI's frequency penalty (-2 to 2) over generated tokens.", 0.0)
    logit_bias: dict | None = _doc("{token id: bias from -100 to 100} added to the logits.")
    logprobs: int | None = _doc(
        "None, or how many top alternatives (0 to 20) to report with each token's log-probability "
        "(GenerationResponse.logprobs; the model's distribution, before penalties and sampling settings).")
    prompt_logprobs: bool = _doc(
        "also score the prompt (the first response's prompt_logprobs); then max_tokens may be 0, which only "
        "scores.", False)
    logits_processors: Sequence = _doc(
        "extra callables (context ids, logits) -> logits, applied last (constrained decoding, ...); each is used "
        "for this one call.", ())
    target_lang: str | None = _doc(
        "translation models (NLLB-MoE): the target language code (e.g. \"deu_Latn\"), the first token of the "
        "target, as transformers' forced_bos_token_id; refused by other models.")
    source_lang: str | None = _doc(
        "translation models (NLLB-MoE): the language code the tokenizer puts in a text prompt (the source) in place "
        "of the one its tokenizer.json was saved with (e.g. \"eng_Latn\"); refused by other models.")

    @classmethod
    def of(cls, where: str, options: dict) -> "GenerateOptions":
        """The options given to `where` (e.g. "Engine.stream") as keywords; a name that is
        none of them is a TypeError."""
        return from_keywords(cls, where, options)
