"""The rules judge: choices answered from the constitution's checks (cai/checks.py), exactly.

`labeler.backend=rules` answers every choice request the pipeline makes, reading what each request is
about from `ChoiceRequest.subject` rather than from its text:

- a comparison under a principle (prefs, eval win rates, audits): the answer that scores higher on
  that principle's check wins; equal scores go to the one with more partial credit (more parts of an
  `all` met in the order written, `Check.partial`); equal both ways, or a check that does not apply to
  the prompt, a tie;
- a grade (eval): "harmless" when the answer satisfies every check that applies to its prompt,
  "refuses" when it declines (the constitution's `refusal` detector, by default the checks' `refuses`);
- a d-RLAIF rating from 1 to 10 (rl.reward=direct): 1 + 9 x the mean score of the checks that apply
  (as the expected rating: the probability is split between the two nearest ratings); a rating that
  names a principle (`cai serve` with serve.per_principle) is read from that principle's check alone.

It writes no text: critiques, revisions and chain-of-thought reasoning need another labeler, and
asking it for them is an error.

**The simulated fallible labeler.** With `labeler.simulated_accuracy` < 1 or
`labeler.simulated_position_bias` > 0 the judge becomes a labeler of known quality: a share
`position_bias` of its answers pick the first option whatever it says; of the others, a share
`accuracy` pick the option the checks pick and the rest the other one (a rating is mirrored). With
`simulated_soft_labels` it gives the option it picked probability `accuracy` instead of 1 — the
calibrated confidence of a labeler that is right that often. Every draw is seeded by the request
itself, so a rerun labels the same way. Asking in both orders (the prefs stage always does) turns a
position-biased answer pair into a tie; soft labels tell the reward model how far to trust a label.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from cai.checks import Check, compliance, distinct_checks, mean_score, principle_checks, refusal_detector
from cai.errors import CaiError
from cai.labelers.base import Choice, ChoiceRequest, GenerateRequest, Generation, Usage

CANNOT_WRITE = (
    "labeler.backend=rules answers choices from the constitution's checks and cannot write text "
    "(critiques, revisions, chain-of-thought reasoning): give that job a labeler that writes"
)


def prompt_kinds(cfg) -> dict[str, str]:
    """Each known prompt's text -> its kind (red_team | helpful | custom), from `data` and `eval.prompts`:
    the checks' `when: {kind: ...}` conditions need it, and the requests carry only the text."""
    from cai.promptsets import split_prompts

    kinds: dict[str, str] = {}
    for by_kind in split_prompts(cfg.data, cfg.seed).values():
        for kind, prompts in by_kind.items():
            kinds.update({p.text: kind for p in prompts})
    for path in cfg.eval.prompts:
        file = Path(path).expanduser()
        if not file.is_file():
            continue  # the eval stage reports a missing file
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the eval stage reports invalid lines
            if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                kinds.setdefault(row["prompt"].strip(), row.get("kind", "custom"))
    return kinds


def judge_constitution(cfg, section):
    """The constitution whose checks a rules labeler config judges by: `section.constitution` when set
    (every comparison principle of the run's constitution must have a check there), else the run's."""
    from cai.constitution import load_constitution

    if not section.constitution:
        return load_constitution(cfg.constitution)
    judge = load_constitution(section.constitution)
    checked = principle_checks(judge)
    missing = [c.id for c in load_constitution(cfg.constitution).comparisons if c.id not in checked]
    if missing:
        raise CaiError(f"{section.constitution}: no principle '{missing[0]}' with a check; a rules judge by this "
                       f"constitution needs a check for every comparison principle of {cfg.constitution}")
    return judge


class RulesLabeler:
    """Choices from checks; optionally a simulated labeler of given accuracy and position bias."""

    def __init__(
        self,
        constitution,
        kinds: dict[str, str] | None = None,
        accuracy: float = 1.0,
        position_bias: float = 0.0,
        soft_labels: bool = False,
        seed: int = 0,
        source: str = "constitution",
    ):
        if not 0.0 <= accuracy <= 1.0:
            raise CaiError(f"labeler.simulated_accuracy must be in [0, 1], got {accuracy}")
        if not 0.0 <= position_bias <= 1.0:
            raise CaiError(f"labeler.simulated_position_bias must be in [0, 1], got {position_bias}")
        for section in ("comparisons",):
            for index, principle in enumerate(getattr(constitution, section)):
                if principle.check is None:
                    raise CaiError(
                        f"{source}: {section}[{index}] (id '{principle.id}'): field 'check' is missing; "
                        "labeler.backend=rules needs a check on every comparison principle"
                    )
        self.by_principle: dict[str, Check] = principle_checks(constitution)
        self.refuses = refusal_detector(constitution)
        self.checks = distinct_checks(constitution)
        if not self.checks:
            raise CaiError(f"{source}: no principle carries a check; labeler.backend=rules has nothing to judge by")
        self.kinds = kinds or {}
        self.accuracy, self.position_bias, self.soft_labels, self.seed = accuracy, position_bias, soft_labels, seed
        simulated = accuracy < 1.0 or position_bias > 0.0
        self.id = f"rules:{constitution.name}" + (
            f" (simulated: accuracy {accuracy:g}, position bias {position_bias:g}, {'soft' if soft_labels else 'hard'} labels)"
            if simulated else ""
        )
        self.simulated = simulated
        self.usage = Usage()

    @classmethod
    def from_config(cls, cfg) -> "RulesLabeler":
        section = cfg.labeler
        path = section.constitution or cfg.constitution
        return cls(
            judge_constitution(cfg, section),
            prompt_kinds(cfg),
            accuracy=section.simulated_accuracy,
            position_bias=section.simulated_position_bias,
            soft_labels=section.simulated_soft_labels,
            seed=cfg.seed,
            source=path,
        )

    # -- the protocol ------------------------------------------------------------------------------

    def generate(self, requests: list[GenerateRequest], desc: str | None = None, **_) -> list[Generation]:
        raise CaiError(CANNOT_WRITE)

    def choose(self, requests: list[ChoiceRequest], desc: str | None = None, **_) -> list[Choice]:
        out = []
        for request in requests:
            self.usage.requests += 1
            if request.subject is None:
                raise CaiError(
                    "labeler.backend=rules was asked a choice it cannot read (a request without a subject): "
                    "it answers comparisons, grades and ratings that cai's stages ask"
                )
            truth = self.truth(request.subject, request.options)
            probs = self.simulate(truth, request) if self.simulated else truth
            out.append(Choice(probs=probs, method="votes", raw=None))
        return out

    def close(self) -> None:
        pass

    # -- the exact answers ---------------------------------------------------------------------------

    def _kind(self, subject: dict) -> str | None:
        return subject.get("kind") or self.kinds.get(subject["prompt"].strip())

    def truth(self, subject: dict, options: tuple[str, ...]) -> list[float]:
        """The option probabilities the checks give, in the order the options were shown."""
        job, prompt, kind = subject.get("job"), subject["prompt"], self._kind(subject)
        if job == "compare":
            check = self.by_principle.get(subject["principle"])
            if check is None:
                raise CaiError(f"labeler.backend=rules: principle '{subject['principle']}' has no check")
            a, b = ((check.score(prompt, answer, kind), check.partial(prompt, answer, kind)) for answer in subject["answers"])
            if a[0] is None or b[0] is None or a == b:
                return [0.5, 0.5]
            return [1.0, 0.0] if a > b else [0.0, 1.0]
        if job == "grade":
            answer = subject["answers"][0]
            if subject["what"] == "harmless":
                good = compliance(self.checks, prompt, answer, kind)["complies"]  # option "harmless" holds
            else:
                good = not self.refuses(prompt, answer)  # option "helps" holds
            p_listed_first = 1.0 if good else 0.0
            return [1.0 - p_listed_first, p_listed_first] if subject["flipped"] else [p_listed_first, 1.0 - p_listed_first]
        if job == "score":  # a rating under every check, or under one principle's (cai serve's per-principle ratings)
            checks = self.checks
            if subject.get("principle") is not None:
                check = self.by_principle.get(subject["principle"])
                if check is None:
                    raise CaiError(f"labeler.backend=rules: principle '{subject['principle']}' has no check")
                checks = {subject["principle"]: check}
            score = mean_score(checks, prompt, subject["answers"][0], kind)
            probs = [0.0] * len(options)
            if score is None:  # nothing applies: the middle of the scale
                probs[len(options) // 2 - 1] = probs[len(options) // 2] = 0.5
            else:  # split between the two nearest ratings, so that the expected rating is 1 + 9 x score exactly
                position = score * (len(options) - 1)
                low = min(int(position), len(options) - 2)
                probs[low], probs[low + 1] = low + 1 - position, position - low
            return probs
        raise CaiError(f"labeler.backend=rules cannot answer a request of job {job!r}")

    # -- the simulated fallible labeler ------------------------------------------------------------

    def simulate(self, truth: list[float], request: ChoiceRequest) -> list[float]:
        """One seeded draw of the fallible labeler for this request (see the module docstring)."""
        key = json.dumps([self.seed, request.messages, request.options, request.sample_index], sort_keys=True)
        rng = random.Random(hashlib.sha256(key.encode()).digest())
        biased, right = rng.random() < self.position_bias, rng.random() < self.accuracy
        n = len(truth)
        confidence = self.accuracy if self.soft_labels else 1.0
        if n == 2:
            if biased:
                pick = 0
            elif truth[0] == truth[1]:
                return list(truth)  # no right answer to miss
            else:
                best = 0 if truth[0] > truth[1] else 1
                pick = best if right else 1 - best
            probs = [1.0 - confidence] * 2
            probs[pick] = confidence
            return probs
        # a rating: mirrored when wrong (1 <-> 10); no position to be biased toward
        return list(truth) if right else list(reversed(truth))
