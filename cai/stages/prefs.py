"""Stage 3, preferences (Bai et al. 2022, section 4.1): the AI compares answers against the constitution.

1. Check everything first: the SFT model exists, the constitution has comparison principles, the
   templates render, the prefs split has prompts of the kinds asked for.
2. The SFT model samples K = `prefs.samples_per_prompt` answers per prompt (`prefs.temperature`);
   they are appended to `prefs/samples.jsonl` per prompt, so a resumed run samples nothing twice.
3. Pairs: every two distinct, non-empty answers of one prompt. Pairs with an empty answer, or two
   identical answers, are counted and left out. With `prefs.stress_pairs: N`, N pairs more: a known
   reward hack (a probe of `cai stress`: keyword stuffing, a refusal then compliance, a repeated offer, a
   refusal of an ordinary request...) beside a good answer to the same prompt (a worked example, a verified
   SL-CAI revision, the SFT model's answer to a helpful prompt). The labeler judges them like every pair;
   the reward model then meets the hacks before PPO finds them.
4. The labeler judges the pairs not yet recorded (`cai.preferences.judge_pairs`: M principles, both
   orders, soft labels, optional chain of thought), a batch at a time; one record per pair is
   appended to `prefs/records.jsonl` as soon as its batch is labeled. When almost every question of
   the first batch comes back unreadable, the stage stops there and says what to try.
5. `prefs/dataset/`: TRL's conversational preference format (`prompt`, `chosen`, `rejected`) plus
   `label_prob`, the labeler's probability that `chosen` is better (>= 0.5). Pairs without a label
   (unreadable in every principle) are counted in `summary.json` and left out.

Steps 2-5 are `cai.pairs`, which the rl stage's rounds of AI feedback also run, on the policy's own answers.
"""

from __future__ import annotations

from pathlib import Path

from cai.chat import conversation, policy_input
from cai.config import Config
from cai.constitution import load_constitution
from cai.errors import CaiError
from cai.labelers import build_labeler, labeler_config, require_writer
from cai.pairs import (
    collect_pairs,
    flip_rate,
    label_pairs,
    pending,
    preference_rows,
    prefs_prompts,
    probe_pairs,
    sample_answers,
)
from cai.policy_server import check_policy, close_policy, open_policy
from cai.preferences import PairItem, comparison_messages, few_shot_turns
from cai.records import atomic_write_json, read_jsonl, save_dataset
from cai.stages import is_current, open_stage, require_done
from cai.templates import Templates


def run(cfg: Config) -> Path:
    # 1. Everything checked before anything is written.
    sft_dir = require_done(cfg, "sft", "prefs")
    constitution = load_constitution(cfg.constitution)
    if not constitution.comparisons:
        raise CaiError(f"{cfg.constitution}: the constitution has no comparison principles; the prefs stage needs at least one")
    templates = Templates(cfg.templates)
    # Render every template the stage uses once, so that a broken one fails here, not mid-run.
    policy_input(templates, "x", cfg.policy.system_prompt)
    probe = PairItem("probe", conversation("x"), "a", "b")
    few_shot_turns(constitution, templates, cfg.prefs.chain_of_thought)
    comparison_messages(templates, [], probe, "q", "ab", chain_of_thought=cfg.prefs.chain_of_thought)
    comparison_messages(templates, [], probe, "q", "ab", reasoning="r", chain_of_thought=cfg.prefs.chain_of_thought)
    prompts = prefs_prompts(cfg)
    if cfg.prefs.stress_pairs:
        probe_pairs(cfg, constitution, cfg.prefs.stress_pairs)  # the probe files and the good answers: one line now if not
    if cfg.prefs.principles_per_pair > len(constitution.comparisons):
        print(f"[prefs] prefs.principles_per_pair={cfg.prefs.principles_per_pair} but the constitution has "
              f"{len(constitution.comparisons)} comparison principles: each pair gets all of them")
    choices = labeler_config(cfg, "choices")  # the preference labels go to the choice labeler
    if cfg.prefs.chain_of_thought:
        require_writer(cfg, "choices", "chain-of-thought reasoning (prefs.chain_of_thought)")
    if choices.backend == "local":
        from cai.models import resolve_model

        resolve_model(choices.model, cfg.cache_dir)
    if not is_current(cfg, "prefs"):  # a finished stage samples nothing: no server needed
        check_policy(cfg, str(sft_dir))  # the sft model's weights here, or a server at policy.base_url serving it

    stage = open_stage(cfg, "prefs", uses_labeler=("choices",))
    if stage.done:
        return stage.path

    # 2. The SFT model samples K answers per prompt.
    samples_path, records_path = stage.path / "samples.jsonl", stage.path / "records.jsonl"
    sampled = {s["id"]: s for s in read_jsonl(samples_path, repair=True)}
    if any(p.id not in sampled for p in prompts):
        policy = open_policy(cfg, str(sft_dir))  # in this process, or on policy.base_url
        try:
            sampled = sample_answers(cfg, policy, prompts, templates, samples_path, str(sft_dir))
        finally:
            close_policy(policy, stage.path)  # a server's usage -> policy_usage.json
        del policy

    # 3. Pairs of distinct, non-empty answers, and the known hacks beside good answers.
    pairs, skipped = collect_pairs(prompts, sampled)
    stress = probe_pairs(cfg, constitution, cfg.prefs.stress_pairs) if cfg.prefs.stress_pairs else []  # samples written: helpful cases too
    pairs += stress

    # 4. The labeler judges the pairs not yet recorded, a batch at a time.
    todo_pairs = pending(pairs, records_path)
    labeler = build_labeler(cfg, role="choices") if todo_pairs else None
    try:
        if todo_pairs:
            label_pairs(cfg, labeler, todo_pairs, constitution, templates, records_path, len(pairs))
    finally:
        if labeler is not None:
            atomic_write_json(stage.path / "labeler_usage.json", {"labeler": labeler.id, **labeler.usage.as_dict()})
            labeler.close()

    # 5. The preference dataset, in TRL's conversational format with the soft label.
    import datasets

    records = read_jsonl(records_path)
    rows = preference_rows(records, templates, cfg.policy.system_prompt)
    if not rows:
        raise CaiError(f"prefs: no pair got a readable label ({len(records)} pairs; see {records_path})")
    dataset = datasets.Dataset.from_list(rows)
    save_dataset(dataset, stage.path / "dataset")
    principle_rows = [e for r in records for e in r["principles"]]
    summary = {
        "prompts": len(prompts),
        "pairs": len(records),
        "labeled": len(rows),
        "unlabeled": {s: sum(r["status"] == s for r in records) for s in ("unparseable", "failed")},
        "skipped_pairs": skipped,
        "principle_questions": len(principle_rows),
        "principle_questions_unreadable": {
            s: sum(e["status"] == s for e in principle_rows) for s in ("unparseable", "failed")
        },
        "mean_label_prob": sum(row["label_prob"] for row in rows) / len(rows),
        "position_flip_rate": flip_rate(records),
        "chain_of_thought": cfg.prefs.chain_of_thought,
    }
    if stress:  # how the labeler judged the hacks: a probe it prefers is one the reward model will learn to pay
        judged = [r for r in records if r["id"].startswith("stress:") and r["status"] == "ok"]
        summary["stress_pairs"] = {
            "pairs": len(stress), "labeled": len(judged),
            "good_preferred": sum(r["label_prob"] > 0.5 for r in judged),
            "probe_preferred": sum(r["label_prob"] < 0.5 for r in judged),
            "probe_preferred_ids": sorted({r["id"].split(":")[1] for r in judged if r["label_prob"] < 0.5}),
        }
    atomic_write_json(stage.path / "summary.json", summary)
    return stage.finish(
        f"{len(prompts)} prompts, {len(records)} pairs labeled by {summary['principle_questions']} principle questions, "
        f"{len(rows)} dataset rows (mean P(chosen better) {summary['mean_label_prob']:.2f})"
        + (f"; {len(stress)} of the pairs set a known hack beside a good answer, the labeler preferred the hack in "
           f"{summary['stress_pairs']['probe_preferred']}" if stress else "")
    )

