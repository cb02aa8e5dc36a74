"""Read a labeler's answer: which option it picked, from its text or from its log-probabilities, and
whether it refused the task.

Option labels are matched exactly as given ("A", "B", "1".."10"), never inside a longer word or
number, so "A good answer" is not a vote for (A) and "10" is not a vote for "1".
"""

from __future__ import annotations

import math
import re

# Phrases that open a refusal. Matched at the start of the answer only: a critique may well quote or
# discuss a refusal further on.
REFUSAL_OPENINGS = (
    "i'm sorry", "i am sorry", "sorry, but", "sorry, i", "i apologize", "i apologise",
    "i can't", "i cannot", "i can not", "i won't", "i will not", "i'm not able", "i am not able",
    "i'm unable", "i am unable", "i must decline", "i'm not comfortable", "i am not comfortable",
    "as an ai", "i do not feel comfortable", "i don't feel comfortable",
)


def is_refusal(text: str | None) -> bool:
    """True when the answer opens by declining the task ("I'm sorry, but I can't...")."""
    if not text:
        return False
    opening = text.strip().lower().replace("\u2019", "'")[:80]
    return opening.startswith(REFUSAL_OPENINGS)


def _label_pattern(options: tuple[str, ...] | list[str]) -> str:
    # Longest first, so "10" is tried before "1"; never glued to a neighbouring letter or digit.
    alternatives = "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))
    return rf"(?<![A-Za-z0-9])({alternatives})(?![A-Za-z0-9])"


def parse_choice(text: str | None, options: tuple[str, ...] | list[str]) -> int | None:
    """Index of the option the answer picks, or None when it picks none or is ambiguous.

    In order: an answer that is just the label ("A", "(A)", "A.", "A)" then anything); an explicit
    "answer is (A)" / "answer: A" / "choice: (B)"; else the only label written in parentheses.
    """
    if not text:
        return None
    options = list(options)
    label = _label_pattern(options)
    stripped = text.strip().lstrip("*#> ").strip()

    # 1. the answer is the label itself
    match = re.match(rf"\(\s*{label}\s*\)", stripped) or re.match(rf"{label}\s*(?:[).:,\]]|\n|$)", stripped)
    if match:
        return options.index(match.group(1))

    # 2. an explicit statement of the answer; the last one wins (a model may correct itself)
    statements = re.findall(
        rf"(?i:answer|choice|verdict)\s*(?:is|would be|:)?\s*:?\s*\**\s*[(\[]?\s*{label}", stripped
    )
    if statements:
        return options.index(statements[-1])

    # 3. exactly one distinct label in parentheses
    in_parens = set(re.findall(rf"\(\s*{label}\s*\)", stripped))
    if len(in_parens) == 1:
        return options.index(in_parens.pop())
    return None


def option_of_token(token: str, options: tuple[str, ...] | list[str]) -> int | None:
    """Which option a single token names: " A", "A", "(A", "A)" all name "A"."""
    core = token.strip().strip("()[]*.:,'\"").strip()
    return options.index(core) if core in options else None


def probs_from_logprobs(
    positions: list[tuple[str, list[tuple[str, float]]]], options: tuple[str, ...] | list[str]
) -> list[float] | None:
    """Option probabilities from an answer's per-token log-probabilities.

    `positions` holds, for each generated token, (the token, its top alternatives as (token, logprob)).
    The answer position is the first whose generated token names an option (so a leading "(" or
    space is skipped); there the probability of each option is the summed probability of the
    alternatives that name it, normalised over the options. None when no generated token names one.
    """
    options = list(options)
    for token, alternatives in positions:
        if option_of_token(token, options) is None:
            continue
        mass = [0.0] * len(options)
        for alt_token, logprob in alternatives:
            index = option_of_token(alt_token, options)
            if index is not None and logprob is not None:
                mass[index] += math.exp(logprob)
        total = sum(mass)
        if total <= 0.0:  # the generated token was not among its own alternatives
            return None
        return [m / total for m in mass]
    return None
