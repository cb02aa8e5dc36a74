"""The labeler protocol: what every AI-feedback backend (local model, OpenAI, Anthropic...) offers.

A labeler does two things, both on batches so that a backend can batch or run requests concurrently:

- `generate`: write text for chat requests (first answers, critiques, revisions, chain-of-thought);
- `choose`: give a probability to each of a few options ("A"/"B", or "1".."10") for a chat request
  whose answer is one of them, from log-probabilities where the backend has them, else from votes.

Results never raise for a single bad item: a request that failed for good comes back with
`status="failed"`, an answer that could not be read with `status="unparseable"` and its raw text,
so a stage records it, counts it, and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
Status = Literal["ok", "failed", "unparseable"]


@dataclass(frozen=True)
class GenerateRequest:
    messages: list[Message]
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    sample_index: int = 0  # distinguishes repeated samples of the same request (seeding, cache key)


@dataclass
class Generation:
    text: str | None
    status: Status = "ok"
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached: bool = False


@dataclass(frozen=True)
class ChoiceRequest:
    """Ask which option answers `messages`.

    `options` are the bare option labels ("A", "B"). `answer_prefix` is the text the answer starts with
    (e.g. "The answer is: ("), put in the assistant turn where the backend allows prefilling, so that
    the next token is the option label.
    """

    messages: list[Message]
    options: tuple[str, ...] = ("A", "B")
    answer_prefix: str = "The answer is: ("
    sample_index: int = 0
    # What the question is about, for judges that do not read text (the rules judge, labelers/rules.py):
    # {"job": "compare" | "grade" | "score", "prompt": user text, "answers": [shown as the options'
    # order], "principle": id (compare), "what": "harmless" | "refuses" and "flipped" (grade)}.
    # It restates the messages, so it is not part of the answer cache's key.
    subject: dict | None = field(default=None, compare=False)


# Each way a choice is read, in words (labeler_usage.json, `cai audit-labeler`).
CHOICE_METHODS = {
    "logits": "next-token probabilities after the prefilled answer prefix (local model)",
    "logprobs+prefill": "log-probabilities of the label after the prefilled answer prefix",
    "logprobs": "log-probabilities of the label, found in the model's own answer (no prefill)",
    "votes": "votes: sampled answers, parsed",
}


@dataclass
class Choice:
    probs: list[float] | None  # one per option, summing to 1; None when failed/unparseable
    # logits: a local model's next-token probabilities after the prefilled prefix; logprobs+prefill: an
    # API's log-probabilities there; logprobs: the label found in the model's own answer; votes: sampled
    method: Literal["logits", "logprobs+prefill", "logprobs", "votes", "none"] = "none"
    status: Status = "ok"
    raw: str | None = None  # raw answer text(s) when parsed from generations
    error: str | None = None
    cached: bool = False


@dataclass
class Usage:
    """What a labeler spent; written to each stage folder."""

    requests: int = 0
    cache_hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    failed: int = 0
    unparseable: int = 0
    retries: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out.update(self.extra)
        return out


@runtime_checkable
class Labeler(Protocol):
    id: str  # e.g. "local:smollm2-135m-instruct" or "openai:gpt-4o-mini@https://..."
    usage: Usage

    def generate(self, requests: list[GenerateRequest], desc: str | None = None) -> list[Generation]: ...

    def choose(self, requests: list[ChoiceRequest], desc: str | None = None) -> list[Choice]: ...

    def close(self) -> None: ...


class BudgetExceeded(Exception):
    """Raised by a labeler when `labeler.max_requests` or `labeler.max_cost` is reached.

    Stages let it propagate after everything already received has been written; the CLI turns it
    into a clean stop with a message, and a rerun with a higher cap continues.
    """
