"""Rounds of AI feedback: the policy's own answers are labeled again while it learns (iterated RLAIF, as in
Online-RLHF, OAIF and iterated DPO), so that the reward never lags far behind the policy it scores.

`rl.rounds = N` cuts the rl stage's `rl.steps` steps into N rounds (`round_bounds`: as even as they go,
earlier rounds one step longer), so that a run with rounds and one without take the same number of
optimisation steps. Round 1 trains on what the prefs stage labeled (the SL-CAI model's pairs). Before each
later round K, in `rl/rounds/round-K/`:

1. the current policy samples `prefs.samples_per_prompt` answers to every prefs-split prompt (at
   `prefs.temperature`) -> `samples.jsonl`, appended per batch;
2. every two distinct answers of a prompt form a pair, and the choice labeler labels the pairs as the
   prefs stage does (`cai.preferences.judge_pairs`: principles drawn per pair, both orders, the answer
   cache) -> `records.jsonl`, appended per batch; what it spent -> `labeler_usage.json`;
3. PPO: the reward model in force so far scores the new pairs: its accuracy on them, before it is
   updated, says how far the policy had drifted from what it was trained on;
4. PPO: the reward model is updated on every label so far (prefs/ and rounds 2..K): trained further from
   the last one (`rl.round_rm=continue`) or afresh from sft/ (`retrain`) -> `rm/`, normalised on the
   SL-CAI model's own samples as the rm stage's is, so every round's reward has the same scale;
   DPO: the round's pairs are what it trains on next, against the SL-CAI reference;
5. `metrics.json`, then `DONE` with the round's fingerprint (the rl stage's and the round's number).

A round is resumed like a stage: a finished one is skipped; a killed one asks the labeler only for the
pairs that have no record yet (and the answer cache has what was in flight); a round folder written
under another config is cleared.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from cai.config import config_hash
from cai.errors import CaiError
from cai.pairs import collect_pairs, label_pairs, pending, preference_rows, prefs_prompts, sample_answers
from cai.records import FINGERPRINT, atomic_write_json, atomic_write_text, is_done, mark_done, read_jsonl, record_labeler_usage
from cai.seeding import stable_seed
from cai.templates import Templates

ROUNDS = "rounds"


# --------------------------------------------------------------------------------------------------
# Steps and folders


def round_bounds(steps: int, rounds: int) -> list[tuple[int, int]]:
    """[(first step, end step)) of each round, 0-based: `steps` cut into `rounds` runs of consecutive steps,
    as even as they go, the earlier ones one step longer (10 steps, 3 rounds: (0, 4), (4, 7), (7, 10))."""
    if not 1 <= rounds <= steps:
        raise ValueError(f"rounds must be between 1 and steps ({steps}), got {rounds}")
    size, extra = divmod(steps, rounds)
    bounds, start = [], 0
    for k in range(rounds):
        end = start + size + (k < extra)
        bounds.append((start, end))
        start = end
    return bounds


def round_at(bounds: list[tuple[int, int]], step: int) -> int:
    """The 1-based round that 0-based `step` belongs to."""
    return next(k for k, (start, end) in enumerate(bounds, 1) if start <= step < end)


def round_ends(bounds: list[tuple[int, int]]) -> set[int]:
    """The steps after which a later round begins (where its feedback is gathered)."""
    return {end for _, end in bounds[:-1]}


def round_folder(stage_path: Path, k: int) -> Path:
    return Path(stage_path) / ROUNDS / f"round-{k}"


def open_round(stage_path: Path, k: int, stage_fingerprint: str) -> tuple[Path, str, bool]:
    """(folder, fingerprint, done) of round `k`: a finished round is left as it is, an unfinished one of
    this config is resumed, one written under another config is cleared."""
    folder = round_folder(stage_path, k)
    fingerprint = config_hash([stage_fingerprint, "round", k])
    if is_done(folder, fingerprint):
        return folder, fingerprint, True
    marker = folder / FINGERPRINT
    if folder.exists() and (not marker.exists() or marker.read_text().strip() != fingerprint):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, fingerprint + "\n")
    return folder, fingerprint, False


def check_rounds(cfg) -> None:
    """Before the rl stage writes anything: what rounds of AI feedback need (PPO: the reward model to
    update; both: the prefs stage's labels, the choice labeler's model)."""
    from cai.labelers import labeler_config
    from cai.stages import require_done

    if cfg.rl.rounds == 1:
        return
    if cfg.rl.algorithm == "ppo" and cfg.rl.reward != "rm":
        raise CaiError(f"rl.rounds > 1 updates the reward model between rounds: it needs rl.reward=rm, not {cfg.rl.reward}")
    require_done(cfg, "prefs", "rl with rl.rounds > 1")
    prefs_prompts(cfg)
    choices = labeler_config(cfg, "choices")
    if choices.backend == "local":
        from cai.models import resolve_model

        resolve_model(choices.model, cfg.cache_dir)


# --------------------------------------------------------------------------------------------------
# 1.-2. The current policy's pairs, labeled


def label_policy(cfg, k: int, folder: Path, model, tokenizer, constitution) -> tuple[list[dict], dict]:
    """Steps 1-2 of round `k`: the policy (`model`, in this process) samples, the choice labeler labels the
    pairs not yet recorded. (the round's records, the pairs skipped for an empty or repeated answer)."""
    from cai.labelers import build_labeler
    from cai.labelers.local import LocalGenerator

    prompts = prefs_prompts(cfg)
    templates = Templates(cfg.templates)
    tag = f"rl round {k}"
    was_training = model.training
    model.eval()
    # Seeded per round: a round's answers do not repeat the sampling noise of the round before.
    generator = LocalGenerator(model, tokenizer, cfg.policy.batch_size, stable_seed(cfg.seed, "rl-round", k), cfg.policy.system_prompt)
    sampled = sample_answers(cfg, generator, prompts, templates, folder / "samples.jsonl", f"rl@round-{k}", tag=tag)
    model.train(was_training)
    pairs, skipped = collect_pairs(prompts, sampled, id_prefix=f"round-{k}:")
    records_path = folder / "records.jsonl"
    todo = pending(pairs, records_path)
    if todo:
        labeler = build_labeler(cfg, role="choices")
        try:
            label_pairs(cfg, labeler, todo, constitution, templates, records_path, len(pairs), tag=tag, extra={"round": k})
        finally:
            record_labeler_usage(folder, labeler)
            labeler.close()
    return read_jsonl(records_path), skipped


def labels_so_far(stage_path: Path, prefs_dir: Path, k: int) -> list[dict]:
    """Every preference record up to round `k`: the prefs stage's, then rounds 2..k's."""
    records = read_jsonl(Path(prefs_dir) / "records.jsonl")
    for j in range(2, k + 1):
        records += read_jsonl(round_folder(stage_path, j) / "records.jsonl")
    return records


# --------------------------------------------------------------------------------------------------
# 3.-4. The reward model: its accuracy on the new pairs, then its update


def reward_accuracy(reward_fn, records: list[dict]) -> dict:
    """How often `reward_fn` (prompts, answers) -> scores ranks a labeled pair's answers as the label does,
    over the pairs whose label picks a side (a tie of the scores counts half). {"pairs", "accuracy", "ci"}:
    the interval is a bootstrap over the pairs."""
    from cai.winrates import bootstrap_ci

    decisive = [r for r in records if r["status"] == "ok" and r["label_prob"] != 0.5]
    if not decisive:
        return {"pairs": 0, "accuracy": None, "ci": None}
    prompts = [r["prompt"] for r in decisive]
    first = reward_fn(prompts, [r["answers"][0] for r in decisive])
    second = reward_fn(prompts, [r["answers"][1] for r in decisive])
    right = [1.0 if (a - b) * (r["label_prob"] - 0.5) > 0 else 0.5 if a == b else 0.0 for r, a, b in zip(decisive, first, second)]
    return {"pairs": len(right), "accuracy": sum(right) / len(right), "ci": bootstrap_ci(right)}


def reward_model_dir(cfg, stage_path: Path, k: int) -> Path:
    """The reward model PPO optimises in round `k`: the rm stage's in round 1, then each round's update."""
    from cai.stages import stage_dir

    return stage_dir(cfg, "rm") if k == 1 else round_folder(stage_path, k) / "rm"


def update_reward_model(cfg, stage_path: Path, k: int, records: list[dict]) -> dict:
    """Step 4: the reward model trained on every label so far -> rounds/round-k/rm/; its metrics."""
    import datasets

    from cai.reward_training import train_reward_model
    from cai.stages import stage_dir

    rows = preference_rows(records, Templates(cfg.templates), cfg.policy.system_prompt)
    if not rows:
        raise CaiError(f"rl round {k}: no preference pair so far has a readable label")
    samples = [(s["prompt"], a) for s in read_jsonl(stage_dir(cfg, "prefs") / "samples.jsonl") for a in s["answers"] if a.strip()]
    start = reward_model_dir(cfg, stage_path, k - 1) if cfg.rl.round_rm == "continue" else stage_dir(cfg, "sft")
    folder = round_folder(stage_path, k)
    return train_reward_model(cfg, datasets.Dataset.from_list(rows), folder / "rm", start_from=start, normalize_on=samples,
                              records=records, checkpoints=folder / "rm-checkpoints")


def ppo_round(cfg, stage_path: Path, stage_fingerprint: str, k: int, model, tokenizer, load_reward):
    """Round `k` >= 2 of PPO (steps 1-5): the reward function PPO optimises from here on.

    `load_reward(rm_dir)` -> reward function reads a reward model folder (the rl stage's loader)."""
    from cai.constitution import load_constitution
    from cai.stages import stage_dir

    folder, fingerprint, done = open_round(stage_path, k, stage_fingerprint)
    if not done:
        started = time.time()
        print(f"[rl] round {k}: the policy's own answers, labeled by the choice labeler")
        records, skipped = label_policy(cfg, k, folder, model, tokenizer, load_constitution(cfg.constitution))
        before = reward_accuracy(load_reward(reward_model_dir(cfg, stage_path, k - 1)), records)
        shown = "n/a" if before["accuracy"] is None else f"{before['accuracy']:.2f}"
        print(f"[rl] round {k}: the reward model so far ranks {shown} of the {before['pairs']} decisive new pairs as the labeler does")
        everything = labels_so_far(stage_path, stage_dir(cfg, "prefs"), k)
        print(f"[rl] round {k}: updating the reward model on {len(everything)} labeled pairs ({cfg.rl.round_rm})")
        rm_metrics = update_reward_model(cfg, stage_path, k, everything)
        atomic_write_json(folder / "metrics.json", round_metrics(k, records, skipped, before, rm_metrics, len(everything),
                                                                 time.time() - started))
        mark_done(folder, fingerprint)
    return load_reward(reward_model_dir(cfg, stage_path, k))


def round_metrics(k: int, records: list[dict], skipped: dict, before: dict | None, rm_metrics: dict | None, labels: int | None,
                  seconds: float, **extra) -> dict:
    """What round `k`'s feedback found (its pairs, how many the labeler decided, the reward model's accuracy
    on them before its update, the update's metrics), for rounds/round-K/metrics.json."""
    ok = [r for r in records if r["status"] == "ok"]
    return {
        "round": k,
        "pairs": len(records),
        "labeled": len(ok),
        "decisive": sum(r["label_prob"] != 0.5 for r in ok),
        "skipped_pairs": skipped,
        "labels_so_far": labels,
        "rm_accuracy_before_update": before,
        "rm": None if rm_metrics is None else {key: rm_metrics.get(key) for key in ("train_pairs", "train_loss", "steps", "held_out", "started_from")},
        "feedback_seconds": round(seconds, 1),
        **extra,
    }


# --------------------------------------------------------------------------------------------------
# What each round did, for metrics.json and the report


def summarize_rounds(stage_path: Path, bounds: list[tuple[int, int]], history: list[dict]) -> list[dict]:
    """Per round: its steps, the reward (the proxy the policy saw) and KL over them, and what its feedback
    found and cost (the labeler's requests and tokens from its usage file)."""
    out = []
    for k, (start, end) in enumerate(bounds, 1):
        steps = [h for h in history if start < h["step"] <= end]
        folder = round_folder(stage_path, k)
        found = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").exists() else {}
        usage = json.loads((folder / "labeler_usage.json").read_text())["total"] if (folder / "labeler_usage.json").exists() else {}
        row = {"round": k, "first_step": start + 1, "last_step": end, **{key: found.get(key) for key in (
            "pairs", "labeled", "decisive", "labels_so_far", "rm_accuracy_before_update", "feedback_seconds", "dpo_pairs", "train_loss")}}
        if steps:
            row.update(reward_first=steps[0].get("reward_mean"), reward_last=steps[-1].get("reward_mean"), kl_last=steps[-1].get("kl"),
                       seconds=round(sum(h.get("seconds", 0.0) for h in steps), 1))
        row["labeler"] = {key: usage.get(key, 0) for key in ("requests", "cache_hits", "input_tokens", "output_tokens", "cost")}
        out.append(row)
    return out
