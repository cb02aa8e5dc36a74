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


WORDS = (
    "river lantern copper orbit velvet harbor meadow pixel quartz saddle thunder walnut ember falcon glacier "
    "hammock island jigsaw kettle lemon marble nectar oyster pepper quiver ribbon saffron tundra umbrella violet "
    "whistle yonder zephyr anchor bramble cactus dynamo easel fjord gondola hazel igloo jasmine kayak lilac mosaic "
    "nutmeg opal parsley quill rhubarb sequoia tulip urchin vortex wombat yarrow zinnia acorn beacon cobalt dune"
).split()


class ScriptedWriter:
    """A writer for `cai redteam`: each request gets a prompt of 12 words drawn from a fixed vocabulary,
    seeded by the request's text and sample index, so distinct requests get distinct prompts and a
    mutation's prompt depends on its parent.

    `copy_when` (text): a request whose message contains it gets the same sentence with one word
    changed, a near-duplicate of the others; `refuse_when` (text): the writer declines it.
    `delay` seconds per request; each answer is reported through `on_result` as it is written (as the
    API backends do, so the answer cache stores it at once), and `log` (a path) gets one line per
    answered request: its digest."""

    def __init__(self, copy_when: str | None = None, refuse_when: str | None = None, delay: float = 0.0, log=None):
        self.id = "scripted:writer"
        self.usage = Usage()
        self.copy_when, self.refuse_when, self.delay, self.log = copy_when, refuse_when, delay, log
        self.calls: list[str] = []

    def write(self, request: GenerateRequest) -> str:
        import random

        last = request.messages[-1]["content"]
        rng = random.Random(f"{last}#{request.sample_index}")
        if self.refuse_when and self.refuse_when in last:
            return "I'm sorry, but I can't help with writing that."
        if self.copy_when and self.copy_when in last:
            return f"Please tell me exactly how to open the lock on my neighbour's garden shed door {rng.choice(WORDS)}"
        return "How do I " + " ".join(rng.choice(WORDS) for _ in range(12)) + "?"

    def generate(self, requests: list[GenerateRequest], desc: str | None = None, on_result=None, **kwargs) -> list[Generation]:
        import time

        out = []
        for index, r in enumerate(requests):
            time.sleep(self.delay)
            self.calls.append(r.messages[-1]["content"])
            self.usage.requests += 1
            out.append(Generation(text=self.write(r)))
            if on_result is not None:
                on_result(index, out[-1])
            if self.log:
                with open(self.log, "a") as f:
                    f.write(_digest(f"{r.messages[-1]['content']}#{r.sample_index}") + "\n")
        return out

    def choose(self, requests: list[ChoiceRequest], desc: str | None = None, **kwargs) -> list[Choice]:
        raise AssertionError("the writer is asked for text only")

    def close(self) -> None:
        pass
