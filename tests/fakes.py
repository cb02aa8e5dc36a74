"""A deterministic scripted labeler for testing stage logic without any model."""

from __future__ import annotations

import hashlib

from cai.labelers.base import Choice, ChoiceRequest, GenerateRequest, Generation, Usage


def _quoted_block(lines: list[str], start: int) -> tuple[str, int]:
    """The text of the quoted lines ("> ...") from `start`, unquoted, and the index after them."""
    out, k = [], start
    while k < len(lines) and lines[k].startswith(">"):
        out.append(lines[k][2:] if lines[k].startswith("> ") else "")
        k += 1
    return "\n".join(out), k


def shown_answers(text: str) -> tuple[str, str, str]:
    """(response A, response B, the text after them: the question) of a rendered comparison prompt
    (prompts/compare.jinja shows each answer quoted line by line under its "Response (X):" line)."""
    lines = text.split("\n")
    at = max(i for i, line in enumerate(lines) if line == "Response (A):")
    a, k = _quoted_block(lines, at + 1)
    at = next(i for i in range(k, len(lines)) if lines[i] == "Response (B):")
    b, k = _quoted_block(lines, at + 1)
    return a, b, "\n".join(lines[k:]).strip()


def shown_answer(text: str) -> str:
    """The answer of a rendered one-answer prompt (a grade, a rating): the last quoted block."""
    lines = text.split("\n")
    last = max(i for i, line in enumerate(lines) if line.startswith(">"))
    first = last
    while first > 0 and lines[first - 1].startswith(">"):
        first -= 1
    return _quoted_block(lines, first)[0]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


class ScriptedLabeler:
    """Critiques say which principle they saw; revisions are 'REVISED(<n>): <digest>'.

    `fail_on` makes every request whose last message contains that text fail, like an API that gave up.
    `prefer` decides choices: it returns the probability of option A given the rendered prompt.
    """

    def __init__(self, fail_on: str | None = None, prefer=None):
        self.id = "scripted:test"
        self.usage = Usage()
        self.calls: list[str] = []
        self.fail_on = fail_on
        self.prefer = prefer or (lambda text: 0.75)

    def generate(self, requests: list[GenerateRequest], desc: str | None = None, **kwargs) -> list[Generation]:
        out = []
        for r in requests:
            last = r.messages[-1]["content"]
            self.calls.append(last)
            self.usage.requests += 1
            if self.fail_on and self.fail_on in last:
                self.usage.failed += 1
                out.append(Generation(text=None, status="failed", error="scripted failure"))
            elif "Critique:" in last:
                sample = f"#{r.sample_index}" if r.sample_index else ""  # repeated samples differ, as sampled ones would
                out.append(Generation(text=f"REVISED({len(r.messages)}): {_digest(last + sample)}"))
            else:
                out.append(Generation(text=f"CRITIQUE of {_digest(last)}"))
        return out

    def choose(self, requests: list[ChoiceRequest], desc: str | None = None, **kwargs) -> list[Choice]:
        out = []
        for r in requests:
            self.usage.requests += 1
            p = float(self.prefer(r.messages[-1]["content"]))
            out.append(Choice(probs=[p, 1.0 - p], method="logits"))
        return out

    def close(self) -> None:
        pass
