"""AI preference labels: which of two answers better meets the constitution (Bai et al. 2022, section 4.1).

The debiased soft-label machinery that the prefs stage, `cai audit-labeler` and the eval stage share:

1. For each pair, M comparison principles are drawn at random from the constitution, seeded by the
   pair's id (so a resumed or repeated run asks the same questions).
2. Each principle is asked as a multiple-choice question (`prompts/compare.jinja`, after the
   constitution's few-shot examples), in both presentation orders: the first answer as (A), then as (B).
3. The labeler gives a probability to each option: from the option tokens' log-probabilities,
   normalised over (A) and (B), or from sampled votes on a backend without log-probabilities.
4. Position bias: the second order is un-flipped (there, the first answer is option B) and the two
   orders' probabilities are averaged.
5. Ensembling: the soft label is the mean over the principles read in both orders.
6. Chain of thought (optional): the labeler first writes its reasoning (`prompts/compare_cot.jinja`),
   then its verdict is scored; each order's probability is clamped to a band (default 40-60%)
   before averaging, because answers after reasoning are overconfident.

A soft label is always P(first answer is better). A question the labeler answered unreadably in either
order is kept in the record with its status and raw text, and left out of the mean; a pair with no
readable principle has no label and says why.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

from cai.chat import conversation
from cai.constitution import ComparisonPrinciple, Constitution, sample_principles
from cai.errors import CaiError
from cai.labelers.base import ChoiceRequest, GenerateRequest, Labeler, Message
from cai.templates import Templates

ANSWER_PREFIX = "The answer is: ("
OPTIONS = ("A", "B")
ORDERS = ("ab", "ba")  # "ab": the first answer is shown as (A); "ba": it is shown as (B)


# -------------------------------------------------------------------------------------------------
# The label maths: pure functions on probabilities


def first_answer_prob(p_option_a: float, order: str) -> float:
    """P(first answer is better) from P(option A) in one presentation order (un-flips "ba")."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return p_option_a if order == "ab" else 1.0 - p_option_a


def clamp(p: float, band: tuple[float, float]) -> float:
    """`p` limited to [low, high] (chain-of-thought labels, Bai et al. 2022 section 4.1)."""
    low, high = band
    return min(max(p, low), high)


def average_orders(p_ab: float, p_ba: float) -> float:
    """The position-debiased probability: the mean of both orders, each already un-flipped."""
    return (p_ab + p_ba) / 2.0


def ensemble(probs: list[float | None]) -> float | None:
    """The mean over the principles that have a probability; None when none has."""
    known = [p for p in probs if p is not None]
    return sum(known) / len(known) if known else None


def position_flip(p_ab: float, p_ba: float) -> bool:
    """True when the labeler's pick changes with the order (both un-flipped, 0.5 counts as "second")."""
    return (p_ab > 0.5) != (p_ba > 0.5)


# -------------------------------------------------------------------------------------------------
# Items, settings, results


@dataclass(frozen=True)
class PairItem:
    """Two answers to one conversation. `conversation` ends with the user's turn both answers reply to."""

    id: str
    conversation: tuple[Message, ...] | list[Message]
    first: str
    second: str
    kind: str | None = None  # the prompt's kind when the caller knows it (cai serve): the checks' `when: {kind}`


@dataclass(frozen=True)
class JudgeSettings:
    """How pairs are judged; `from_config` reads `cfg.prefs` and `cfg.labeler`."""

    principles_per_pair: int = 4
    few_shot: bool = True
    chain_of_thought: bool = False
    cot_clamp: tuple[float, float] = (0.4, 0.6)
    reasoning_max_new_tokens: int = 192
    reasoning_temperature: float = 0.7
    reasoning_top_p: float = 0.95
    seed: int = 0
    principles: tuple[ComparisonPrinciple, ...] | None = None  # replaces the constitution's comparisons

    @classmethod
    def from_config(cls, cfg, **overrides: Any) -> "JudgeSettings":
        settings = cls(
            principles_per_pair=cfg.prefs.principles_per_pair,
            few_shot=cfg.prefs.few_shot,
            chain_of_thought=cfg.prefs.chain_of_thought,
            cot_clamp=tuple(cfg.prefs.cot_clamp),
            reasoning_max_new_tokens=cfg.prefs.reasoning_max_new_tokens,
            reasoning_temperature=cfg.labeler.temperature,
            reasoning_top_p=cfg.labeler.top_p,
            seed=cfg.seed,
        )
        return replace(settings, **overrides)


@dataclass
class PairJudgement:
    """The labeler's verdict on one pair: `label` = P(first answer is better), or None with `status`."""

    item_id: str
    label: float | None
    status: str  # ok | unparseable | failed
    principles: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"label_prob": self.label, "status": self.status, "principles": self.principles}


def draw_comparisons(comparisons: list[ComparisonPrinciple], seed: int, item_id: str, m: int) -> list[ComparisonPrinciple]:
    """M distinct principles for one pair, seeded by (seed, pair): independent of batching and resume."""
    rng = random.Random(f"{seed}:compare:{item_id}")
    return sample_principles(comparisons, rng, min(m, len(comparisons)))


# -------------------------------------------------------------------------------------------------
# Requests


def user_text(conversation) -> str:
    """The last user turn of a conversation: the prompt the answers reply to."""
    return next((m["content"] for m in reversed(list(conversation)) if m["role"] == "user"), "")


def _compare_vars(conversation, response_a: str, response_b: str, question: str) -> dict:
    return dict(conversation=list(conversation), response_a=response_a, response_b=response_b, question=question)


def few_shot_turns(constitution: Constitution, templates: Templates, chain_of_thought: bool) -> list[Message]:
    """The constitution's comparison examples as earlier turns, answered the way the labeler should."""
    turns: list[Message] = []
    for ex in constitution.examples.comparison:
        variables = _compare_vars(conversation(ex.prompt), ex.response_a, ex.response_b, ex.question)
        verdict = f"{ANSWER_PREFIX}{ex.answer})"
        if not chain_of_thought:
            turns += [
                {"role": "user", "content": templates.render("compare.jinja", **variables)},
                {"role": "assistant", "content": verdict},
            ]
        elif ex.reasoning:  # an example without reasoning cannot show the chain-of-thought form
            turns += [
                {"role": "user", "content": templates.render("compare_cot.jinja", reasoning=None, **variables)},
                {"role": "assistant", "content": ex.reasoning},
                {"role": "user", "content": templates.render("compare_cot.jinja", reasoning=ex.reasoning, **variables)},
                {"role": "assistant", "content": verdict},
            ]
    return turns


def comparison_messages(
    templates: Templates,
    shots: list[Message],
    item: PairItem,
    question: str,
    order: str,
    reasoning: str | None = None,
    chain_of_thought: bool = False,
) -> list[Message]:
    """The chat messages that ask `question` about `item` in one order.

    In chain-of-thought mode without `reasoning`, the messages that ask for the reasoning; with it, the
    messages that ask for the verdict after it.
    """
    a, b = (item.first, item.second) if order == "ab" else (item.second, item.first)
    variables = _compare_vars(item.conversation, a, b, question)
    if not chain_of_thought:
        return [*shots, {"role": "user", "content": templates.render("compare.jinja", **variables)}]
    ask = {"role": "user", "content": templates.render("compare_cot.jinja", reasoning=None, **variables)}
    if reasoning is None:
        return [*shots, ask]
    verdict = {"role": "user", "content": templates.render("compare_cot.jinja", reasoning=reasoning, **variables)}
    return [*shots, ask, {"role": "assistant", "content": reasoning}, verdict]


# -------------------------------------------------------------------------------------------------
# Judging


def judge_pairs(
    labeler: Labeler,
    items: list[PairItem],
    constitution: Constitution,
    templates: Templates,
    cfg=None,
    settings: JudgeSettings | None = None,
    desc: str | None = None,
) -> list[PairJudgement]:
    """Soft preference labels for `items`, debiased for position and ensembled over principles.

    Settings come from `cfg` (`JudgeSettings.from_config`) unless `settings` is given. Every request of
    every item goes to the labeler in one `choose` call (plus one `generate` call before it in
    chain-of-thought mode), so a backend can batch them: the local labeler computes the part of the
    prompt that a pair's principles share once per order, and both orders in one batch.
    """
    if settings is None:
        if cfg is None:
            raise ValueError("judge_pairs needs cfg or settings")
        settings = JudgeSettings.from_config(cfg)
    comparisons = list(settings.principles) if settings.principles is not None else constitution.comparisons
    if not comparisons:
        raise CaiError(f"constitution '{constitution.name}' has no comparison principles; the preference labels need at least one")
    cot = settings.chain_of_thought
    shots = few_shot_turns(constitution, templates, cot) if settings.few_shot else []

    # 1.-2. principles per pair, each question in both orders
    slots = []  # (item index, principle, order)
    for index, item in enumerate(items):
        for principle in draw_comparisons(comparisons, settings.seed, item.id, settings.principles_per_pair):
            for order in ORDERS:
                slots.append((index, principle, order))

    # 6. chain of thought: the reasoning first, for every slot
    reasonings: list = [None] * len(slots)
    if cot:
        asks = [
            GenerateRequest(
                comparison_messages(templates, shots, items[i], p.question, order, chain_of_thought=True),
                max_new_tokens=settings.reasoning_max_new_tokens,
                temperature=settings.reasoning_temperature,
                top_p=settings.reasoning_top_p,
            )
            for i, p, order in slots
        ]
        reasonings = labeler.generate(asks, desc=f"{desc} (reasoning)" if desc else None)

    # 3. option probabilities, in one call
    requests, asked = [], []
    for k, (i, p, order) in enumerate(slots):
        if cot and (reasonings[k].status != "ok" or not (reasonings[k].text or "").strip()):
            continue
        text = reasonings[k].text.strip() if cot else None
        messages = comparison_messages(templates, shots, items[i], p.question, order, reasoning=text, chain_of_thought=cot)
        shown = (items[i].first, items[i].second) if order == "ab" else (items[i].second, items[i].first)
        subject = {"job": "compare", "principle": p.id, "prompt": user_text(items[i].conversation), "answers": list(shown)}
        if items[i].kind is not None:
            subject["kind"] = items[i].kind
        requests.append(ChoiceRequest(messages, options=OPTIONS, answer_prefix=ANSWER_PREFIX, subject=subject))
        asked.append(k)
    choices: list = [None] * len(slots)
    for k, choice in zip(asked, labeler.choose(requests, desc=desc) if requests else []):
        choices[k] = choice

    # 4.-5. un-flip, clamp (chain of thought), average the orders, ensemble the principles
    per_item: list[dict[str, dict]] = [{} for _ in items]
    for k, (i, p, order) in enumerate(slots):
        entry = per_item[i].setdefault(p.id, {"id": p.id, "question": p.question, "orders": {}})
        entry["orders"][order] = _order_record(choices[k], reasonings[k] if cot else None, order, settings)
    judgements = []
    for item, entries in zip(items, per_item):
        principles = []
        for entry in entries.values():
            orders = entry["orders"]
            statuses = [orders[o]["status"] for o in ORDERS]
            if all(s == "ok" for s in statuses):
                entry["p_first"] = average_orders(orders["ab"]["p_first"], orders["ba"]["p_first"])
                entry["status"] = "ok"
            else:
                entry["p_first"] = None
                entry["status"] = "failed" if "failed" in statuses else "unparseable"
            principles.append(entry)
        label = ensemble([e["p_first"] for e in principles])
        if label is not None:
            status = "ok"
        else:
            status = "failed" if any(e["status"] == "failed" for e in principles) else "unparseable"
        judgements.append(PairJudgement(item.id, label, status, principles))
    return judgements


UNREADABLE_STOP_SHARE = 0.9  # of a first batch's principle questions: the labeler cannot answer choices


def readable_share(judgements: list[PairJudgement]) -> tuple[int, int]:
    """(principle questions read, principle questions asked) over `judgements`; a question is read
    when both its orders gave a probability."""
    entries = [e for j in judgements for e in j.principles]
    return sum(e["status"] == "ok" for e in entries), len(entries)


def check_labeler_reads(judgements: list[PairJudgement], labeler_id: str, asked: str | None, choice_method: str) -> None:
    """Stop, with one line that says so, shows one raw answer and names what to try, when almost every
    principle question of a first batch came back unreadable: the rest would go the same way, and
    spend the whole budget first."""
    read, total = readable_share(judgements)
    unreadable = [o for j in judgements for e in j.principles for o in e["orders"].values() if o["status"] == "unparseable"]
    if not total or not unreadable or (total - read) < UNREADABLE_STOP_SHARE * total:
        return
    raw = next((o["raw"] for o in unreadable if o.get("raw")), None)
    shown = repr(raw[:120] + ("..." if len(raw) > 120 else "")) if raw else "(no text)"
    other = "votes" if choice_method != "votes" else "logprobs"
    raise CaiError(
        f"prefs: the labeler {labeler_id} gave no readable choice for {total - read} of {total} principle "
        f"questions of the first batch (asked by {asked or 'its backend'}; one raw answer: {shown}); try "
        f"labeler.choice_method={other}, a larger labeler.model, or a comparison template "
        f"(prompts/compare.jinja, templates=...) that makes the model answer with the label; "
        f"`cai audit-labeler` measures a labeler in a minute"
    )


def _order_record(choice, reasoning, order: str, settings: JudgeSettings) -> dict:
    """What one order of one principle produced, with P(first answer better) when it was readable."""
    record: dict[str, Any] = {"p_option_a": None, "p_first": None}
    if reasoning is not None:
        record["reasoning"] = reasoning.text
        if reasoning.status != "ok" or not (reasoning.text or "").strip():
            record.update(status=reasoning.status if reasoning.status != "ok" else "unparseable",
                          error=reasoning.error or "empty reasoning", method=None)
            return record
    if choice is None:
        record.update(status="failed", error="no answer", method=None)
        return record
    record.update(status=choice.status, method=choice.method, raw=choice.raw, error=choice.error)
    probs = choice.probs
    if choice.status != "ok" or not probs or len(probs) != 2 or any(p is None for p in probs) or sum(probs) <= 0:
        if choice.status == "ok":
            record.update(status="unparseable", error=choice.error or f"unusable probabilities {probs}")
        return record
    p_a = probs[0] / (probs[0] + probs[1])
    p_first = first_answer_prob(p_a, order)
    if settings.chain_of_thought:
        p_first = clamp(p_first, settings.cot_clamp)
    record.update(p_option_a=p_a, p_first=p_first)
    return record


# -------------------------------------------------------------------------------------------------
# The preference dataset

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def _text_of(value) -> str:
    """The text of a conversational field (a list of messages) or of a plain string."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(m.get("content") or "" for m in value if isinstance(m, dict))
    return ""


def check_preference_dataset(dataset, source: str, need_label_prob: bool = True) -> None:
    """Refuse, in one line that says which, a preference dataset with a missing column, an empty
    answer, or a `label_prob` outside [0, 1]."""
    needed = PREFERENCE_COLUMNS + (("label_prob",) if need_label_prob else ())
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise CaiError(
            f"{source}: the preference dataset has no column {', '.join(repr(c) for c in missing)} "
            f"(it has: {', '.join(dataset.column_names)})"
        )
    if len(dataset) == 0:
        raise CaiError(f"{source}: the preference dataset is empty")
    for column in ("chosen", "rejected"):
        for row, value in enumerate(dataset[column]):
            if not _text_of(value).strip():
                raise CaiError(f"{source}: row {row}: the '{column}' answer is empty")
    if need_label_prob:
        for row, value in enumerate(dataset["label_prob"]):
            if value is None or not 0.0 <= float(value) <= 1.0:
                raise CaiError(f"{source}: row {row}: label_prob must be a probability in [0, 1], got {value!r}")


def expected_calibration_error(probs: list[float], outcomes: list[float], bins: int = 10) -> float | None:
    """ECE of binary predictions: confidence max(p, 1 - p) against how often the predicted side is right.

    `outcomes` are 1 when the first side is right, 0 when the second is (0.5 for a tie counts half).
    """
    if not probs:
        return None
    buckets: list[list[tuple[float, float]]] = [[] for _ in range(bins)]
    for p, y in zip(probs, outcomes):
        confidence = max(p, 1.0 - p)
        correct = y if p >= 0.5 else 1.0 - y
        buckets[min(int((confidence - 0.5) * 2 * bins), bins - 1)].append((confidence, correct))
    return sum(
        len(b) / len(probs) * abs(sum(c for c, _ in b) / len(b) - sum(r for _, r in b) / len(b)) for b in buckets if b
    )
