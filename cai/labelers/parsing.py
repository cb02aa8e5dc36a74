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


def _label_stands_alone(before: str, token: str, after: str, options: list[str]) -> bool:
    """True when `token` names an option as a word of its own: no letter or digit glued to it on either
    side (so "1" followed by "0" is not the option "1"), and not the article of an answer that opens
    "A good answer..."."""
    core = token.strip().strip("()[]*.:,'\"").strip()
    at = token.find(core)
    left = before + token[:at]
    right = token[at + len(core):] + after
    if (left and left[-1].isalnum()) or (right and right[0].isalnum()):
        return False
    opens_answer = not left.strip()
    return not (opens_answer and re.match(r"\s+[A-Za-z]", right))


def probs_from_logprobs(
    positions: list[tuple[str, list[tuple[str, float]]]],
    options: tuple[str, ...] | list[str],
    context: str = "",
) -> list[float] | None:
    """Option probabilities from an answer's per-token log-probabilities.

    `positions` holds, for each generated token, (the token, its top alternatives as (token, logprob));
    `context` is the text the answer continues (a prefilled "The answer is: (", or nothing). The model
    may write a preamble first ("The answer is: (B)"), so every position is looked at, in order; the
    answer position is the first where
    - the generated token names an option standing alone (see `_label_stands_alone`), or
    - the text so far ends with "(" and an option is among the alternatives (the question the local
      backend asks after its prefix), unless the generated token is a longer label ("10" after "(").
    There the probability of each option is the summed probability of the alternatives that name it,
    normalised over the options. None when no position qualifies.
    """
    options = list(options)
    tokens = [token for token, _ in positions]
    before = context
    for k, (token, alternatives) in enumerate(positions):
        after = "".join(tokens[k + 1 :])
        named = option_of_token(token, options) is not None
        alone = named and _label_stands_alone(before, token, after, options)
        opened = before.rstrip().endswith("(") and not named
        before += token
        if not (alone or opened):
            continue
        mass = [0.0] * len(options)
        for alt_token, logprob in alternatives:
            index = option_of_token(alt_token, options)
            if index is not None and logprob is not None:
                mass[index] += math.exp(logprob)
        total = sum(mass)
        if total <= 0.0:  # no option among the alternatives here: look further on
            continue
        return [m / total for m in mass]
    return None
