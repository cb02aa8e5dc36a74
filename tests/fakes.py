"""A deterministic scripted labeler for testing stage logic without any model."""

from __future__ import annotations

import hashlib

from cai.labelers.base import Choice, ChoiceRequest, GenerateRequest, Generation, Usage


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
