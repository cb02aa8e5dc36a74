"""Does a reward model rank held-out answers as the independent checks do? Reward models side by side.

A finished run's eval stage leaves every compared model's answers to the held-out prompts
(`eval/answers.jsonl`: initial, SL-CAI and RL answers to prompts no stage trained on). Each reward
model named scores all of them, and each column is an AUC against the checks no stage trained against
(cai/independent_checks.py, the judge of configs/quickstart.yaml):

- red-team prompts: does an answer the checks count as declining the request score above one that does
  not? (declines_harm)
- helpful prompts: does an answer that helps fully score above a refusal or a stub? (full_help)

0.5 is chance; 1 is a reward model that orders every such pair as the checks do. With a per-principle
reward model (rm.per_principle) each principle's own output gets a row too, and "as PPO reads it" sums
the outputs where each principle's check applies to the prompt's kind, by the run's rl.principle_weights
(cai.policy_models.reward_as_ppo_reads_it).

    python benchmarks/reward_probe.py out/quickstart/eval out/quickstart/rm other_run/rm ...
    python benchmarks/reward_probe.py out/quickstart/eval run/rm --set 'rl.principle_weights={full_help: 1}'

Run it on two cores with nothing else running only for its timing; the AUCs do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def auc(positive: list[float], negative: list[float]) -> float | None:
    """P(a random positive scores above a random negative), ties counted half; None without both."""
    if not positive or not negative:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def probe(eval_dir: Path, rm_dir: Path, cache_dir: str, overrides: list[str] = ()) -> list[tuple[str, dict]]:
    """[(row label, {kind: (auc, positives, negatives)})] for one reward model."""
    from cai import independent_checks
    from cai.config import load_config
    from cai.policy_models import reward_as_ppo_reads_it
    from cai.records import read_jsonl
    from cai.rewards import RewardModelScorer

    answers = read_jsonl(eval_dir / "answers.jsonl")
    prompts, texts, kinds = [a["prompt"] for a in answers], [a["answer"] for a in answers], [a["kind"] for a in answers]
    wanted = {"red_team": independent_checks.declines_harm, "helpful": independent_checks.full_help}
    good = [wanted[k](p, t) >= 1.0 if k in wanted else None for p, t, k in zip(prompts, texts, kinds)]

    def row(scores: list[float]) -> dict:
        out = {}
        for kind in wanted:
            pos = [s for s, k, g in zip(scores, kinds, good) if k == kind and g]
            neg = [s for s, k, g in zip(scores, kinds, good) if k == kind and g is False]
            out[kind] = (auc(pos, neg), len(pos), len(neg))
        return out

    scorer = RewardModelScorer(rm_dir, cache_dir)
    rows = [("score (mean of its outputs)", row(scorer(prompts, texts)))]
    if scorer.principles:
        cfg = load_config(rm_dir / "config.yaml", list(overrides))  # the run's: its constitution, rl.principle_weights
        rows.append(("as PPO reads it", row(reward_as_ppo_reads_it(cfg, scorer)(prompts, texts, kinds))))
        outputs = scorer.outputs(prompts, texts).mean(dim=1)  # [N, P]
        rows += [(f"  output: {p}", row(outputs[:, j].tolist())) for j, p in enumerate(scorer.principles)]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("eval_dir", type=Path, help="a finished eval stage's folder (its answers.jsonl)")
    parser.add_argument("rm_dirs", type=Path, nargs="+", help="finished rm stage folders")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "cai"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for how PPO reads the reward, e.g. 'rl.principle_weights={full_help: 1}'")
    args = parser.parse_args(argv)

    def cell(value) -> str:
        a, pos, neg = value
        return f"{'n/a' if a is None else f'{a:.2f}'} ({pos} vs {neg})"

    print("| reward model | row | red-team: declines_harm AUC (pos vs neg) | helpful: full_help AUC (pos vs neg) |")
    print("|---|---|---:|---:|")
    for rm_dir in args.rm_dirs:
        for label, values in probe(args.eval_dir, rm_dir, args.cache_dir, args.set):
            print(f"| {rm_dir} | {label} | {cell(values['red_team'])} | {cell(values['helpful'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
