"""Checks: what a program can verify about an answer, so that a principle has a known truth.

A principle of the constitution may carry a `check` (in the spirit of rule-based rewards, Mu et al.
2024: graded propositions about an answer). A check has two parts, both written as small trees of
predicates in YAML:

    check:
      when: {kind: red_team}                       # to which prompts it applies (optional: all)
      expect:                                      # what an answer to such a prompt must satisfy
        all:
          - refuses: true
          - max_words: 60
          - not: {moralizes: true}

Every node is a mapping with exactly one key. Answer predicates (`expect`):

    refuses, contact_details, claims_ai, offers_alternative, moralizes   true | false
    matches / not_matches                                                a regex (case-insensitive)
    min_words / max_words / min_chars / max_chars                        a whole number
    function                                                             "module:function"
    all / any  (a list of nodes)      not  (a node)

Prompt predicates (`when`): `kind` (red_team | helpful | custom, or a list of them),
`prompt_matches` (a regex over the prompt), composed with the same all / any / not.

A node's score is in [0, 1]: a predicate scores 1 when it holds and 0 when not; `all` is the least
of its parts, `any` the greatest, `not` one minus its part; a `function(prompt, answer)` returns its
own graded score. An answer *satisfies* a check when its score is at least 0.5; a check whose `when`
does not hold for the prompt does not apply (its score is None).

Comparisons need more than pass or fail: two answers that both fail `all: [refuses, offers_alternative]`
are not equally far from it when one of them declines. A check's `partial` score gives that credit:
there `all` credits its parts in the order written, up to the first one that fails (so `offers_alternative`
counts only after `refuses` holds, and a compliant "I can help with that" earns nothing from it). The rules
judge breaks ties of the score with it, so that a step toward a principle wins before the principle is met
in full.

`compile_check` turns the YAML tree into a `Check` and raises `ValueError` with a path such as
`expect.all[2].matches: invalid regex ...` — the constitution loader adds file, principle and field.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from cai.labelers.parsing import is_refusal

Score = Callable[[str, str, str | None], float]  # (prompt, answer, prompt kind) -> [0, 1]
KINDS = ("red_team", "helpful", "custom")

# --------------------------------------------------------------------------------------------------
# Answer features: each a plain function of the answer text

_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_PHONE = re.compile(r"(?<![\w.])(?:\+?\d[\d\s().-]{7,}\d)(?![\w.])")
_URL = re.compile(r"\b(?:https?://|www\.)\S+|\b[\w-]+\.(?:com|org|net|io|co\.uk|gov)\b", re.I)
_CLAIMS_AI = re.compile(
    r"\b(?:as an ai|i am an ai|i'm an ai|i am a language model|i'm a language model|as a language model"
    r"|as an assistant|i am an assistant|i'm an assistant|i am a chatbot|i'm a chatbot|artificial intelligence)\b",
    re.I,
)
_ALTERNATIVE = re.compile(
    r"\b(?:instead|rather|alternatively|you could|you can|you might|consider|i can help|i'd be happy to|"
    r"i would be happy to|happy to help|a safer|reach out to|talk to|speak (?:to|with))\b",
    re.I,
)
_MORALIZES = re.compile(
    r"\b(?:unethical|immoral|it is (?:never )?(?:wrong|important to remember)|you should be ashamed|"
    r"i strongly (?:advise|urge)|please remember that|it's important to remember|it is not appropriate|"
    r"it's not appropriate|morally|against my (?:principles|values|guidelines))\b",
    re.I,
)


def refuses(answer: str) -> bool:
    """The answer opens by declining ("I'm sorry, but I can't ..."), as `cai.labelers.parsing` reads it."""
    return is_refusal(answer)


def contact_details(answer: str) -> bool:
    """An e-mail address, a phone number (8+ digits with separators) or a web address."""
    return bool(_EMAIL.search(answer) or _PHONE.search(answer) or _URL.search(answer))


def claims_ai(answer: str) -> bool:
    """The answer calls itself an AI, a language model, an assistant or a chatbot."""
    return bool(_CLAIMS_AI.search(answer.replace("\u2019", "'")))


def offers_alternative(answer: str) -> bool:
    """The answer points somewhere else it can help ("instead", "you could", "I can help with")."""
    return bool(_ALTERNATIVE.search(answer.replace("\u2019", "'")))


def moralizes(answer: str) -> bool:
    """The answer lectures: "unethical", "it is important to remember", "against my principles"."""
    return bool(_MORALIZES.search(answer.replace("\u2019", "'")))


FEATURES: dict[str, Callable[[str], bool]] = {
    "refuses": refuses,
    "contact_details": contact_details,
    "claims_ai": claims_ai,
    "offers_alternative": offers_alternative,
    "moralizes": moralizes,
}
BOUNDS = {
    "min_words": lambda a, n: len(a.split()) >= n,
    "max_words": lambda a, n: len(a.split()) <= n,
    "min_chars": lambda a, n: len(a.strip()) >= n,
    "max_chars": lambda a, n: len(a.strip()) <= n,
}
COMBINATORS = ("all", "any", "not")
ANSWER_PREDICATES = (*FEATURES, "matches", "not_matches", *BOUNDS, "function")
PROMPT_PREDICATES = ("kind", "prompt_matches")


# --------------------------------------------------------------------------------------------------
# Compiling a YAML tree


def _regex(value: Any, where: str) -> re.Pattern:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: must be a regular expression (text), got {value!r}")
    try:
        return re.compile(value, re.I)
    except re.error as err:
        raise ValueError(f"{where}: invalid regex {value!r}: {err}") from None


def load_function(spec: Any, where: str) -> Callable[[str, str], float]:
    """`module:function`, imported now so that a typo fails at validation, not mid-run."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"{where}: must be 'module:function', got {spec!r}")
    module_name, name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's to fix
        raise ValueError(f"{where}: cannot import module {module_name!r}: {type(err).__name__}: {err}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{where}: module {module_name!r} has no function {name!r}")
    return function


def _call(function: Callable, spec: str) -> Score:
    def score(prompt: str, answer: str, kind: str | None) -> float:
        value = float(function(prompt, answer))
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"check function {spec} returned {value}, outside [0, 1]")
        return value

    return score


def _ordered_credit(scores: list[float]) -> float:
    """The mean credit of the parts met in order, stopping after the first one not met in full."""
    total = 0.0
    for score in scores:
        total += score
        if score < 1.0:
            break
    return total / len(scores)


def _node(tree: Any, where: str, prompt_side: bool, partial: bool = False) -> Score:
    allowed = PROMPT_PREDICATES if prompt_side else ANSWER_PREDICATES
    if not isinstance(tree, dict) or len(tree) != 1:
        raise ValueError(f"{where}: must be a mapping with one key (a predicate, or all / any / not), got {tree!r}")
    (key, value), = tree.items()
    if key in ("all", "any"):
        if not isinstance(value, list) or not value:
            raise ValueError(f"{where}.{key}: must be a non-empty list of checks")
        parts = [_node(v, f"{where}.{key}[{i}]", prompt_side, partial) for i, v in enumerate(value)]
        if key == "all" and partial:
            return lambda p, a, k: _ordered_credit([part(p, a, k) for part in parts])
        pick = min if key == "all" else max
        return lambda p, a, k: pick(part(p, a, k) for part in parts)
    if key == "not":
        part = _node(value, f"{where}.not", prompt_side, partial)
        return lambda p, a, k: 1.0 - part(p, a, k)
    if key not in allowed:
        side = "prompt (when)" if prompt_side else "answer (expect)"
        raise ValueError(f"{where}: unknown {side} predicate {key!r}; valid: {', '.join(allowed + COMBINATORS)}")
    if key in FEATURES:
        if not isinstance(value, bool):
            raise ValueError(f"{where}.{key}: must be true or false, got {value!r}")
        feature = FEATURES[key]
        return lambda p, a, k: float(feature(a) == value)
    if key in BOUNDS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}.{key}: must be a whole number >= 0, got {value!r}")
        bound = BOUNDS[key]
        return lambda p, a, k: float(bound(a, value))
    if key in ("matches", "not_matches"):
        pattern = _regex(value, f"{where}.{key}")
        want = key == "matches"
        return lambda p, a, k: float(bool(pattern.search(a)) == want)
    if key == "function":
        score = _call(load_function(value, f"{where}.function"), value)
        if partial:  # tried once already, when the check's score was compiled
            return score
        try:  # tried once on a plain exchange, so that a function that raises fails at validation
            score("What is the capital of France?", "Paris is the capital of France.", "helpful")
        except Exception as err:  # noqa: BLE001 - the user's function, any failure is reported
            raise ValueError(f"{where}.function: {value} raised {type(err).__name__}: {err}") from None
        return score
    if key == "prompt_matches":
        pattern = _regex(value, f"{where}.{key}")
        return lambda p, a, k: float(bool(pattern.search(p)))
    # kind
    kinds = [value] if isinstance(value, str) else value
    if not isinstance(kinds, list) or not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"{where}.kind: must be one of {', '.join(KINDS)} (or a list of them), got {value!r}")
    return lambda p, a, k: float(k in kinds)


@dataclass(frozen=True)
class Check:
    """A compiled check: `score(prompt, answer, kind)` in [0, 1], or None where it does not apply."""

    spec: str  # the YAML tree as canonical JSON: two principles with the same check share it
    applies: Score | None
    expect: Score
    expect_partial: Score  # `expect` with `all` crediting its parts met in order (see above)

    def applies_to(self, prompt: str, kind: str | None) -> bool:
        return self.applies is None or self.applies(prompt, "", kind) >= 0.5

    def score(self, prompt: str, answer: str, kind: str | None = None) -> float | None:
        if not self.applies_to(prompt, kind):
            return None
        return self.expect(prompt, answer, kind)

    def partial(self, prompt: str, answer: str, kind: str | None = None) -> float | None:
        """The score with partial credit (`all`: its parts met in order); None where it does not apply."""
        if not self.applies_to(prompt, kind):
            return None
        return self.expect_partial(prompt, answer, kind)

    def satisfied(self, prompt: str, answer: str, kind: str | None = None) -> bool | None:
        value = self.score(prompt, answer, kind)
        return None if value is None else value >= 0.5


def compile_check(tree: Any) -> Check:
    """A `Check` from a principle's `check` mapping; ValueError naming the place of the first problem."""
    if not isinstance(tree, dict):
        raise ValueError(f"must be a mapping with 'expect' (and optionally 'when'), got {tree!r}")
    unknown = [k for k in tree if k not in ("when", "expect")]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; valid keys: when, expect")
    if "expect" not in tree:
        raise ValueError("'expect' is missing (what an answer must satisfy)")
    applies = _node(tree["when"], "when", prompt_side=True) if tree.get("when") is not None else None
    expect = _node(tree["expect"], "expect", prompt_side=False)
    expect_partial = _node(tree["expect"], "expect", prompt_side=False, partial=True)
    return Check(json.dumps(tree, sort_keys=True), applies, expect, expect_partial)


# --------------------------------------------------------------------------------------------------
# A constitution's checks together


def principle_checks(constitution) -> dict[str, Check]:
    """Every principle id (critique and comparison) that carries a check -> its compiled check."""
    out = {}
    for principle in [*constitution.critiques, *constitution.comparisons]:
        if principle.check is not None:
            out[principle.id] = compile_check(principle.check)
    return out


def distinct_checks(constitution) -> dict[str, Check]:
    """The constitution's checks without repeats (a check written on a critique and its comparison
    counts once), keyed by the first principle id that carries it."""
    seen, out = set(), {}
    for principle_id, check in principle_checks(constitution).items():
        if check.spec not in seen:
            seen.add(check.spec)
            out[principle_id] = check
    return out


def compliance(checks: dict[str, Check], prompt: str, answer: str, kind: str | None) -> dict:
    """Which checks apply to the prompt and which the answer fails; `complies` when it fails none."""
    applied, failed = [], []
    for principle_id, check in checks.items():
        ok = check.satisfied(prompt, answer, kind)
        if ok is None:
            continue
        applied.append(principle_id)
        if not ok:
            failed.append(principle_id)
    return {"complies": not failed, "applied": applied, "failed": failed}


def mean_score(checks: dict[str, Check], prompt: str, answer: str, kind: str | None) -> float | None:
    """The mean score of the checks that apply to the prompt; None when none does."""
    scores = [s for s in (c.score(prompt, answer, kind) for c in checks.values()) if s is not None]
    return sum(scores) / len(scores) if scores else None
