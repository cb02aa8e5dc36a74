"""Read a labeler's answer: which option it picked, from its text or from its log-probabilities.
(Whether an answer declines is `cai.checks.refuses`, the one refusal predicate.)

Both readers find the label with `label_at`: an explicit answer statement first ("the answer is (B)",
"B is better than A"), otherwise the last label standing on its own. An answer under judgement may
contain option letters to be misread ("Response (B) is harmful; the answer is (A)"), and a model's
reply may quote it: one definition keeps the log-probability reader and the vote reader from reading
the same reply two ways.
"""

from __future__ import annotations

import math
import re

def _label_pattern(options: tuple[str, ...] | list[str]) -> str:
    # Longest first, so "10" is tried before "1"; never glued to a neighbouring letter or digit.
    alternatives = "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))
    return rf"(?<![A-Za-z0-9])({alternatives})(?![A-Za-z0-9])"


# Words after a capital "A" that make it a label ("A is better", "A and B"); before any other lower-case
# word it is the article ("A good answer would be (B)").
_NOT_AN_ARTICLE = {"is", "was", "seems", "appears", "wins", "would", "and", "or", "vs", "versus", "because", "since",
                   "than", "over", "but", "as", "for", "with", "clearly", "definitely", "again", "here"}
_BETTER = (r"(?:better|best|preferable|preferred|superior|stronger|safer|kinder|more\s+\w+|less\s+(?:harmful|toxic|"
           r"preachy|evasive|verbose))")


def _statements(label: str) -> list[str]:
    """Regular expressions of an explicit answer statement, each with the label as group 1."""
    open_ = r"\**\s*(?:response\s+|option\s+|reply\s+)?[(\[]?\s*"
    return [
        # "The answer is (B)", "Answer: A", "My choice: (B)", "Rating: (7)", "verdict - B"
        rf"(?i:answer|choice|verdict|decision|rating|score|grade)\s*(?:is|would be|:|=|-)?\s*:?\s*{open_}{label}",
        # "The better response is (B)", "the more helpful one would be A"
        rf"(?i:(?:the\s+)?{_BETTER}\s+(?:response|answer|reply|one|option)\s+(?:is|would be|:))\s*:?\s*{open_}{label}",
        # "I choose (B)", "I'd pick A", "I would rate it a 7", "I give it 7"
        rf"(?i:i(?:'d| would)?\s+(?:choose|pick|select|prefer|go with|rate (?:it|this)(?: an?)?|give (?:it|this)(?: an?)?))"
        rf"\s*:?\s*{open_}{label}",
        # "B is better than A", "Response (B) is clearly the safer one", "(A) would be preferable"
        rf"(?:(?i:response|option|reply)\s+)?[(\[]?\s*{label}\s*[)\]]?\s+(?i:is|seems|appears|would be)\s+"
        rf"(?i:(?:clearly|much|far|slightly|definitely|the|a|by far)\s+)*(?i:{_BETTER})",
        # "7/9", "7 out of 9": the rating is the numerator
        rf"{label}\s*(?:/|(?i:out of))\s*\d",
        # an answer that opens with the label: "(A)", "A.", "B)", "A: because ..."
        rf"^\W{{0,3}}[(\[]\s*{label}\s*[)\]]",
        rf"^\W{{0,3}}{label}\s*(?:[).:,\]]|\n|$)",
    ]


def _standing(text: str, start: int, end: int) -> bool:
    """Whether the label at text[start:end] is an option on its own: not the article "A" before a word,
    not a number of a scale ("from 0 to 9", "out of 9", "/9")."""
    label = text[start:end]
    after = text[end:]
    if label == "A":
        word = re.match(r"\s+([a-z]+)\b", after)
        if word and word.group(1) not in _NOT_AN_ARTICLE:
            return False
    before = text[:start]
    if label.isdigit() and re.search(r"(?i:out of|scale of|from|between)\s*$|/\s*$|\d\s*(?:to|-|–|and)\s*$", before):
        return False
    return True


def label_at(text: str | None, options: tuple[str, ...] | list[str]) -> tuple[int, int] | None:
    """Where the answer states its pick: (option index, character offset of the label), or None.

    The one definition both readers use (votes read `text`; log-probabilities are read at the token
    found here). In order:
    1. an explicit answer statement — "the answer is (B)", "Answer: A", "I choose B", "the better response
       is (A)", "B is better than A", "7 out of 9", or the label the answer opens with ("(A)", "B.");
       the last one when there are several (a model may correct itself);
    2. otherwise the last label standing on its own (never glued to a letter or digit; a capital "A"
       before a word is the article, "A good answer"; numbers of a stated scale are not ratings).
    Labels are matched exactly as given ("A", "B", "0".."9"), so "10" is not a "1".
    """
    if not text:
        return None
    options = list(options)
    label = _label_pattern(options)
    found: list[tuple[int, int]] = []
    for pattern in _statements(label):
        for match in re.finditer(pattern, text, re.M):
            found.append((match.start(1), options.index(match.group(1))))
    if found:
        offset, index = max(found)
        return index, offset
    standing = [(m.start(1), options.index(m.group(1))) for m in re.finditer(label, text)
                if _standing(text, m.start(1), m.end(1))]
    if standing:
        offset, index = standing[-1]
        return index, offset
    return None


def parse_choice(text: str | None, options: tuple[str, ...] | list[str]) -> int | None:
    """Index of the option a written answer picks (`label_at`), or None when it names none."""
    where = label_at(text, options)
    return None if where is None else where[0]


def option_of_token(token: str, options: tuple[str, ...] | list[str]) -> int | None:
    """Which option a single token names: " A", "A", "(A", "A)" all name "A"."""
    core = token.strip().strip("()[]*.:,'\"").strip()
    return options.index(core) if core in options else None


def _mass(alternatives: list[tuple[str, float]], options: list[str]) -> list[float] | None:
    """The options' probabilities among one position's alternatives, normalised; None when none is there."""
    mass = [0.0] * len(options)
    for alt_token, logprob in alternatives:
        index = option_of_token(alt_token, options)
        if index is not None and logprob is not None:
            mass[index] += math.exp(logprob)
    total = sum(mass)
    return [m / total for m in mass] if total > 0 else None


def probs_from_logprobs(
    positions: list[tuple[str, list[tuple[str, float]]]],
    options: tuple[str, ...] | list[str],
    context: str = "",
) -> list[float] | None:
    """Option probabilities from an answer's per-token log-probabilities.

    `positions` holds, for each generated token, (the token, its top alternatives as (token, logprob));
    `context` is the text the answer continues (a prefilled "The answer is: (", or nothing). The answer
    position is the token that holds the label `label_at` finds in context + answer — the same label the
    vote reader takes from the same text — and the probability of each option there is the summed
    probability of the alternatives that name it, normalised over the options. The token must name that
    option by itself (the "1" of a "10" is no reading of "10"). With no label written after a prefilled
    "(", the first position is the answer position (the model wrote something else there, "Both", but the
    options are among its alternatives). None when no position qualifies.
    """
    options = list(options)
    tokens = [token for token, _ in positions]
    text = context + "".join(tokens)
    starts, at = [], len(context)
    for token in tokens:
        starts.append(at)
        at += len(token)
    where = label_at(text, options)
    if where is not None and where[1] >= len(context):
        index, offset = where
        k = max(i for i, start in enumerate(starts) if start <= offset)
        if option_of_token(tokens[k], options) == index:
            return _mass(positions[k][1], options)
        return None
    if where is None and positions and context.rstrip().endswith("("):
        first = tokens[0]
        named = option_of_token(first, options)
        if named is None:  # not a longer label either ("1" then "0" after "(" is a 10, not a 1)
            return _mass(positions[0][1], options)
    return None
