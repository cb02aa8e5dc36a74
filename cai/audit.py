"""`cai audit-labeler`: how good are the configured labeler's preference labels?

The labeler judges gold binary comparisons exactly as the prefs stage judges pairs (`judge_pairs`: the
same template and few-shot examples, M principles, both orders, soft labels, chain of thought if
configured), and its verdicts are scored against the gold answers:

- accuracy: how often the debiased soft label favours the gold answer (a tie counts half); also the
  accuracy from the first presentation order alone, to show what asking both orders buys;
- position-flip rate: how often a principle's pick changes when the order of the answers does, and
  how often option (A) is picked at all (0.5 = no position preference);
- length bias: how often the longer answer wins, against how often it is the gold answer;
- calibration: expected calibration error of the soft label (10 bins of confidence);
- how the labeler asked (next-token probabilities, log-probabilities with or without a prefilled
  answer, votes) and the share of principle questions it could read at all: an API labeler whose
  answers cannot be read shows it here in a minute, before a prefs stage spends its budget.

The default gold set is the 438 helpful/honest/harmless comparisons published with the Constitutional
AI paper (`cai/data/hhh_438.jsonl`). Each row's multiple-choice prompt is taken apart into the
conversation and the two options, so that they go through cai's own comparison template. A gold file
may also hold rows of `prompt` (text or messages), `chosen` and `rejected`.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cai.chat import conversation
from cai.errors import CaiError
from cai.records import numbered_jsonl
from cai.labelers.base import CHOICE_METHODS
from cai.preferences import ORDERS, JudgeSettings, PairItem, judge_pairs, position_flip, readable_share

DEFAULT_GOLD = Path(__file__).resolve().parent / "data" / "hhh_438.jsonl"

_HHH = re.compile(
    r"^\s*Consider the following conversation between a human and an assistant:\s*(?P<conversation>.*?)"
    r"\n\s*\n(?P<question>[^\n]*?)\s*Options:\s*\n\s*\(A\)\s*\[\[\[(?P<a>.*?)\]\]\]\s*\n\s*\(B\)\s*\[\[\[(?P<b>.*?)\]\]\]"
    r"\s*The answer is:\s*$",
    re.S,
)
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


@dataclass(frozen=True)
class GoldPair:
    item: PairItem
    correct: int  # 0: the first answer is the gold answer, 1: the second
    question: str | None  # the row's own question, where the file has one


def parse_turns(text: str) -> list[dict]:
    """'Human: ...\\n\\nAssistant: ...' as chat messages."""
    parts = _TURN.split(text.strip())
    if parts[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return turns


def parse_hhh_row(row: dict) -> tuple[list[dict], str, str, str, int]:
    """(conversation, question, option A, option B, index of the correct option) of one HHH row."""
    match = _HHH.match(row["prompt"])
    if not match:
        raise ValueError("the prompt is not a two-option multiple-choice question in the HHH form")
    turns = parse_turns(match["conversation"])
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the conversation does not end with the human's turn")
    correct = row["corrects"][0].strip()
    if correct not in ("(A)", "(B)") or len(row["corrects"]) != 1:
        raise ValueError(f"corrects must be [' (A)'] or [' (B)'], got {row['corrects']!r}")
    return turns, match["question"].strip(), match["a"].strip(), match["b"].strip(), 0 if correct == "(A)" else 1


def load_gold(path: str | Path) -> list[GoldPair]:
    """Gold pairs from an HHH-style file (prompt/corrects/incorrects) or a prompt/chosen/rejected file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CaiError(f"gold file not found: {path}")
    pairs = []
    for number, line, row in numbered_jsonl(path.read_text(encoding="utf-8"), f"{path}:"):
        item_id = "gold:" + hashlib.sha256(line.encode()).hexdigest()[:12]
        try:
            if "corrects" in row:
                turns, question, a, b, correct = parse_hhh_row(row)
                pairs.append(GoldPair(PairItem(item_id, turns, a, b), correct, question))
            elif {"prompt", "chosen", "rejected"} <= set(row):
                prompt = row["prompt"]
                turns = conversation(prompt) if isinstance(prompt, str) else list(prompt)
                answer = lambda v: v if isinstance(v, str) else v[-1]["content"]  # noqa: E731
                # the gold answer goes first or second at random (seeded by the row), like the HHH rows
                flip = int(hashlib.sha256(line.encode()).digest()[0]) % 2
                first, second = (answer(row["rejected"]), answer(row["chosen"])) if flip else (answer(row["chosen"]), answer(row["rejected"]))
                pairs.append(GoldPair(PairItem(item_id, turns, first, second), flip, row.get("question")))
            else:
                raise ValueError("needs either prompt/corrects/incorrects or prompt/chosen/rejected")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise CaiError(f"{path}: line {number}: {err}") from None
    if not pairs:
        raise CaiError(f"{path}: holds no gold comparisons")
    return pairs


def audit_metrics(gold: list[GoldPair], judgements) -> dict:
    """The audit's numbers from the gold pairs and `judge_pairs`' verdicts on them."""
    from cai.preferences import expected_calibration_error

    labeled = [(g, j) for g, j in zip(gold, judgements) if j.label is not None]
    n = len(labeled)

    def p_correct(g: GoldPair, p_first: float) -> float:
        return p_first if g.correct == 0 else 1.0 - p_first

    def hit(g: GoldPair, p_first: float) -> float:
        return 0.5 if p_first == 0.5 else float((p_first > 0.5) == (g.correct == 0))

    read, asked = readable_share(judgements)
    methods: dict[str, int] = {}
    for j in judgements:
        for e in j.principles:
            for o in e["orders"].values():
                if o.get("status") == "ok" and o.get("method"):
                    methods[o["method"]] = methods.get(o["method"], 0) + 1
    metrics: dict = {
        "pairs": len(gold),
        "labeled": n,
        "unlabeled": {s: sum(j.status == s for j in judgements) for s in ("unparseable", "failed")},
        "questions_asked": asked,
        "questions_read": read,
        "readable_share": read / asked if asked else None,
        "choices_by_method": methods,
    }
    if not n:
        return metrics
    metrics["accuracy"] = sum(hit(g, j.label) for g, j in labeled) / n
    metrics["mean_prob_of_gold_answer"] = sum(p_correct(g, j.label) for g, j in labeled) / n
    # the first order alone: what a judge that shows each pair once would score
    first_only = []
    for g, j in labeled:
        ab = [e["orders"]["ab"]["p_first"] for e in j.principles if e["status"] == "ok"]
        first_only.append(hit(g, sum(ab) / len(ab)))
    metrics["accuracy_first_order_only"] = sum(first_only) / n
    principles = [e for _, j in labeled for e in j.principles if e["status"] == "ok"]
    metrics["principle_questions"] = len(principles)
    metrics["position_flip_rate"] = sum(position_flip(e["orders"]["ab"]["p_first"], e["orders"]["ba"]["p_first"]) for e in principles) / len(principles)
    picks_a = [e["orders"][o]["p_option_a"] > 0.5 for e in principles for o in ORDERS]
    metrics["option_a_rate"] = sum(picks_a) / len(picks_a)
    # length bias: over pairs whose answers differ in length
    longer = [(g, j) for g, j in labeled if len(g.item.first) != len(g.item.second) and j.label != 0.5]
    if longer:
        def longer_index(g):
            return 0 if len(g.item.first) > len(g.item.second) else 1

        metrics["longer_answer_wins"] = sum((0 if j.label > 0.5 else 1) == longer_index(g) for g, j in longer) / len(longer)
        metrics["longer_answer_is_gold"] = sum(g.correct == longer_index(g) for g, _ in longer) / len(longer)
    metrics["expected_calibration_error"] = expected_calibration_error(
        [j.label for _, j in labeled], [1.0 if g.correct == 0 else 0.0 for g, _ in labeled]
    )
    metrics["mean_confidence"] = sum(max(j.label, 1 - j.label) for _, j in labeled) / n
    return metrics


def format_table(report: dict) -> str:
    """The audit as a short Markdown table."""
    m = report["metrics"]

    def pct(key: str) -> str:
        return f"{100 * m[key]:.1f}%" if m.get(key) is not None else "n/a"

    methods = ", ".join(f"{k} {v}" for k, v in sorted(m.get("choices_by_method", {}).items(), key=lambda kv: -kv[1]))
    rows = [
        ("how the labeler asked", report.get("asked") or "n/a"),
        ("choices read by", methods or "none"),
        ("principle questions read", f"{m.get('questions_read', 'n/a')} of {m.get('questions_asked', 'n/a')} ({pct('readable_share')})"),
        ("gold pairs labeled", f"{m['labeled']} of {m['pairs']}"
         + (f" ({m['unlabeled']['unparseable']} unreadable, {m['unlabeled']['failed']} failed)" if m["labeled"] < m["pairs"] else "")),
        ("accuracy (both orders, ensembled)", pct("accuracy")),
        ("accuracy (first order only)", pct("accuracy_first_order_only")),
        ("mean P(gold answer)", pct("mean_prob_of_gold_answer")),
        ("position-flip rate", pct("position_flip_rate")),
        ("option (A) picked", pct("option_a_rate")),
        ("longer answer wins / is gold", f"{pct('longer_answer_wins')} / {pct('longer_answer_is_gold')}"),
        ("expected calibration error", f"{m['expected_calibration_error']:.3f}" if m.get("expected_calibration_error") is not None else "n/a"),
        ("mean confidence", pct("mean_confidence")),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [
        f"Labeler audit: {report['labeler']} on {report['gold']} "
        f"({report['principles']}, {'chain of thought, ' if report['chain_of_thought'] else ''}both orders, soft labels)",
        "",
        f"| {'metric':<{width}} | value |",
        f"|{'-' * (width + 2)}|-------|",
    ]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)


def run_audit(cfg, gold: str | None = None, limit: int | None = None, principles: str = "constitution", out: str | None = None) -> dict:
    """Judge the gold pairs with the configured labeler, print the table, write JSON and Markdown."""
    from cai.constitution import ComparisonPrinciple, load_constitution
    from cai.labelers import build_labeler
    from cai.records import atomic_write_json, atomic_write_text, ensure_writable
    from cai.templates import Templates

    constitution = load_constitution(cfg.constitution)
    templates = Templates(cfg.templates)
    gold_path = Path(gold).expanduser() if gold else DEFAULT_GOLD
    pairs = load_gold(gold_path)
    if limit is not None:
        if limit < 1:
            raise CaiError(f"--limit must be at least 1, got {limit}")
        order = list(range(len(pairs)))
        random.Random(f"{cfg.seed}:audit").shuffle(order)  # a seeded sample, not the file's first rows
        pairs = [pairs[i] for i in sorted(order[:limit])]
    settings = JudgeSettings.from_config(cfg)
    if principles == "gold":
        questions = sorted({p.question for p in pairs if p.question})
        if not questions:
            raise CaiError(f"{gold_path}: --principles gold needs rows that carry their own question")
        settings = JudgeSettings.from_config(
            cfg, principles=tuple(ComparisonPrinciple(id=f"gold-{i}", question=q) for i, q in enumerate(questions))
        )
        described = "the gold file's own question"
    elif principles == "constitution":
        if not constitution.comparisons:
            raise CaiError(f"{cfg.constitution}: the constitution has no comparison principles to audit with")
        m = min(settings.principles_per_pair, len(constitution.comparisons))
        described = f"{m} of {len(constitution.comparisons)} principles of '{constitution.name}' per pair"
    else:
        raise CaiError(f"--principles must be constitution or gold, got {principles!r}")
    out_dir = ensure_writable(Path(out).expanduser() if out else Path(cfg.output_dir).expanduser() / "audit")

    labeler = build_labeler(cfg, role="choices")
    started = time.time()
    judgements = []
    try:
        per_call = max(1, cfg.labeler.batch_size)
        for start in range(0, len(pairs), per_call):
            batch = pairs[start : start + per_call]
            print(f"[audit] judging gold pairs {start + 1}-{start + len(batch)} of {len(pairs)}")
            judgements += judge_pairs(labeler, [p.item for p in batch], constitution, templates, settings=settings)
        usage = labeler.usage.as_dict()
    finally:
        labeler.close()
    metrics = audit_metrics(pairs, judgements)
    # how it asked: the API labeler says so itself; otherwise the method its choices carry
    asked = usage.get("choice_asked")
    if asked is None and metrics["choices_by_method"]:
        top = max(metrics["choices_by_method"], key=metrics["choices_by_method"].get)
        asked = CHOICE_METHODS.get(top, top)
    report = {
        "labeler": labeler.id,
        "gold": f"{gold_path.name} ({len(pairs)} pairs{', seeded sample' if limit else ''})",
        "principles": described,
        "chain_of_thought": settings.chain_of_thought,
        "few_shot": settings.few_shot,
        "seconds": round(time.time() - started, 1),
        "asked": asked,
        "metrics": metrics,
        "usage": usage,
        "items": [
            {"id": p.item.id, "correct": p.correct, **j.as_dict()} for p, j in zip(pairs, judgements)
        ],
    }
    table = format_table(report)
    atomic_write_json(out_dir / "labeler_audit.json", report)
    atomic_write_text(out_dir / "labeler_audit.md", table + "\n")
    print(table)
    print(f"\n(written to {out_dir / 'labeler_audit.json'} and labeler_audit.md)")
    return report
