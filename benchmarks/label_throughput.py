"""Preference-labeling throughput: cai's judge against a naive judge on the same model.

    .venv/bin/python benchmarks/label_throughput.py [--pairs 16] [--principles 4] [--out FILE]

Both judge the same gold pairs (a seeded sample of the 438 HHH comparisons) with the embedded default
labeler (SmolLM2-135M-Instruct), the same comparison prompt and few-shot examples (constitutions/
harmless.yaml), the same M principles per pair and both presentation orders:

- cai: `judge_pairs` on the local labeler. Soft labels from the option tokens' probabilities, no
  generation; the context that a pair's principles share (few-shot examples, conversation, both
  answers) is computed once per order, both orders in one batch, then one short suffix per principle.
- cai, no prefix sharing: the same soft labels, every request a whole forward pass (batched). It shows
  how much of the gain is the shared key/value cache and how much is not generating.
- naive: for every principle and order, one request at a time, the model generates its answer
  (greedy, up to 16 tokens) and "(A)"/"(B)" is parsed out of the text; the label is the mean of the
  un-flipped votes over the readable answers.

Reported: pairs per second, the speed-up over the naive judge, and each judge's accuracy on the pairs
(ties count half). The labeler cache is not used: every request is computed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cai.audit import DEFAULT_GOLD, audit_metrics, load_gold  # noqa: E402
from cai.config import load_config  # noqa: E402
from cai.constitution import load_constitution  # noqa: E402
from cai.labelers.base import GenerateRequest  # noqa: E402
from cai.labelers.local import LocalGenerator  # noqa: E402
from cai.labelers.parsing import parse_choice  # noqa: E402
from cai.models import load_model_and_tokenizer  # noqa: E402
from cai.preferences import (  # noqa: E402
    ORDERS,
    JudgeSettings,
    PairJudgement,
    average_orders,
    comparison_messages,
    draw_comparisons,
    ensemble,
    few_shot_turns,
    first_answer_prob,
    judge_pairs,
)
from cai.templates import Templates  # noqa: E402


class SoftJudge:
    """The labeler protocol's `choose` straight on a LocalGenerator (no cache), sharing or not."""

    def __init__(self, generator: LocalGenerator, share: bool):
        self.generator, self.share, self.id = generator, share, "local:smollm2-135m-instruct"

    def choose(self, requests, desc=None):
        return self.generator.option_probs(requests, share_prefix=self.share)


def naive_judge(generator, items, constitution, templates, settings) -> list[PairJudgement]:
    """Generate, then parse, one request at a time."""
    shots = few_shot_turns(constitution, templates, False) if settings.few_shot else []
    judgements = []
    for item in items:
        principles = []
        for principle in draw_comparisons(constitution.comparisons, settings.seed, item.id, settings.principles_per_pair):
            orders = {}
            for order in ORDERS:
                messages = comparison_messages(templates, shots, item, principle.question, order)
                [answer] = generator.generate([GenerateRequest(messages, max_new_tokens=16, temperature=0.0)])
                pick = parse_choice(answer.text, ("A", "B"))
                p_a = None if pick is None else float(pick == 0)
                orders[order] = {
                    "raw": answer.text,
                    "p_option_a": p_a,
                    "p_first": None if p_a is None else first_answer_prob(p_a, order),
                    "status": "ok" if p_a is not None else "unparseable",
                }
            readable = [orders[o]["p_first"] for o in ORDERS if orders[o]["p_first"] is not None]
            ok = len(readable) == 2
            principles.append({
                "id": principle.id, "orders": orders, "status": "ok" if ok else "unparseable",
                "p_first": average_orders(*readable) if ok else None,
            })
        label = ensemble([e["p_first"] for e in principles])
        judgements.append(PairJudgement(item.id, label, "ok" if label is not None else "unparseable", principles))
    return judgements


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=16, help="gold pairs judged by each judge")
    parser.add_argument("--principles", type=int, default=4, help="principles per pair (M)")
    parser.add_argument("--batch-size", type=int, default=16, help="the local labeler's batch size")
    parser.add_argument("--round-size", type=int, default=4, help="pairs per round; each judge runs every round in turn")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-unshared", action="store_true", help="leave out the no-sharing variant")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"prefs.principles_per_pair={args.principles}"])
    constitution = load_constitution(cfg.constitution)
    templates = Templates(cfg.templates)
    settings = JudgeSettings.from_config(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg.labeler.model, cfg, {})
    generator = LocalGenerator(model, tokenizer, batch_size=args.batch_size, seed=cfg.seed)

    gold = load_gold(DEFAULT_GOLD)
    import random

    order = list(range(len(gold)))
    random.Random("benchmark").shuffle(order)
    sample = [gold[i] for i in sorted(order[: args.pairs])]
    items = [g.item for g in sample]
    device = str(generator.device)
    print(f"{len(items)} gold pairs, M={args.principles}, both orders, on {device} "
          f"({torch.get_num_threads()} threads); warming up")
    judge_pairs(SoftJudge(generator, True), items[:1], constitution, templates, settings=settings)
    naive_judge(generator, items[:1], constitution, templates, settings)

    variants = {"cai": lambda batch: judge_pairs(SoftJudge(generator, True), batch, constitution, templates, settings=settings)}
    if not args.skip_unshared:
        variants["cai, no prefix sharing"] = lambda batch: judge_pairs(
            SoftJudge(generator, False), batch, constitution, templates, settings=settings
        )
    variants["naive: generate + parse, one request at a time"] = lambda batch: naive_judge(
        generator, batch, constitution, templates, settings
    )
    # Rounds of a few pairs, every judge in turn: a machine shared with other jobs slows all alike.
    seconds = {name: 0.0 for name in variants}
    judged: dict[str, list] = {name: [] for name in variants}
    for start in range(0, len(items), args.round_size):
        batch = items[start : start + args.round_size]
        for name, fn in variants.items():
            judgements, took = timed(partial(fn, batch))
            seconds[name] += took
            judged[name] += judgements
        print(f"pairs {start + 1}-{start + len(batch)}: " + ", ".join(f"{n.split(':')[0]} {seconds[n]:.0f}s" for n in variants))
    rows = {}
    for name in variants:
        metrics = audit_metrics(sample, judged[name])
        rows[name] = {
            "seconds": round(seconds[name], 2),
            "pairs_per_second": len(items) / seconds[name],
            "accuracy": metrics.get("accuracy"),
            "labeled": metrics["labeled"],
            "unreadable_principle_questions": sum(e["status"] != "ok" for j in judged[name] for e in j.principles),
            "position_flip_rate": metrics.get("position_flip_rate"),
        }
    naive = rows["naive: generate + parse, one request at a time"]["pairs_per_second"]
    for row in rows.values():
        row["speedup_vs_naive"] = row["pairs_per_second"] / naive
    report = {
        "pairs": len(items),
        "principles_per_pair": args.principles,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "results": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print()
    print("| judge | seconds | pairs/s | speed-up | accuracy | unreadable questions |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        accuracy = f"{100 * row['accuracy']:.1f}%" if row["accuracy"] is not None else "n/a"
        print(f"| {name} | {row['seconds']:.1f} | {row['pairs_per_second']:.3f} | {row['speedup_vs_naive']:.1f}x "
              f"| {accuracy} | {row['unreadable_principle_questions']} |")


if __name__ == "__main__":
    main()
