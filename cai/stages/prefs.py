"""Stage 3, preferences (Bai et al. 2022, section 4.1): the AI compares answers against the constitution.

1. Check everything first: the SFT model exists, the constitution has comparison principles, the
   templates render, the prefs split has prompts of the kinds asked for.
2. The SFT model samples K = `prefs.samples_per_prompt` answers per prompt (`prefs.temperature`);
   they are appended to `prefs/samples.jsonl` per prompt, so a resumed run samples nothing twice.
3. Pairs: every two distinct, non-empty answers of one prompt. Pairs with an empty answer, or two
   identical answers, are counted and left out.
4. The labeler judges the pairs not yet recorded (`cai.preferences.judge_pairs`: M principles, both
   orders, soft labels, optional chain of thought), a batch at a time; one record per pair is
   appended to `prefs/records.jsonl` as soon as its batch is labeled. When almost every question of
   the first batch comes back unreadable, the stage stops there and says what to try.
5. `prefs/dataset/`: TRL's conversational preference format (`prompt`, `chosen`, `rejected`) plus
   `label_prob`, the labeler's probability that `chosen` is better (>= 0.5). Pairs without a label
   (unreadable in every principle) are counted in `summary.json` and left out.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from cai.chat import conversation, policy_input
from cai.config import Config
from cai.constitution import load_constitution
from cai.errors import CaiError
from cai.labelers import GenerateRequest, build_labeler, labeler_config, require_writer
from cai.policy_server import check_policy, close_policy, open_policy
from cai.preferences import (
    PairItem,
    check_labeler_reads,
    comparison_messages,
    few_shot_turns,
    judge_pairs,
    position_flip,
)
from cai.promptsets import split_prompts
from cai.records import JsonlWriter, atomic_write_json, read_jsonl, save_dataset
from cai.stages import is_current, open_stage, require_done
from cai.templates import Templates


def form_pairs(sample: dict) -> tuple[list[dict], dict]:
    """The pairs of one prompt's answers, and how many were skipped for an empty or repeated answer."""
    pairs, skipped = [], {"empty_answer": 0, "identical_answers": 0}
    for i, j in itertools.combinations(range(len(sample["answers"])), 2):
        first, second = sample["answers"][i], sample["answers"][j]
        if not first.strip() or not second.strip():
            skipped["empty_answer"] += 1
        elif first.strip() == second.strip():
            skipped["identical_answers"] += 1
        else:
            pairs.append({"id": f"{sample['id']}:{i}-{j}", "indices": [i, j], "first": first, "second": second})
    return pairs, skipped


def to_preference_row(record: dict, templates: Templates, system_prompt: str | None) -> dict:
    """One record as a TRL conversational preference row; `label_prob` = P(chosen is better) >= 0.5.
    The prompt is the policy's input as it was sampled, so the reward model and DPO train on it."""
    p = record["label_prob"]
    first, second = record["answers"]
    chosen, rejected = (first, second) if p >= 0.5 else (second, first)
    return {
        "prompt": policy_input(templates, record["prompt"], system_prompt),
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "label_prob": max(p, 1.0 - p),
        "id": record["id"],
        "kind": record["kind"],
    }


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
    split = split_prompts(cfg.data, cfg.seed)["prefs"]
    kinds = [k for k, on in (("red_team", cfg.prefs.include_red_team), ("helpful", cfg.prefs.include_helpful)) if on]
    if not kinds:
        raise CaiError("prefs: include_red_team and include_helpful are both false; there is nothing to label")
    prompts = [p for kind in kinds for p in split[kind]]
    if not prompts:
        raise CaiError(f"data: the prefs split has no {' or '.join(kinds)} prompts; add prompts or raise data.fractions.prefs")
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
    samples_path, records_path = stage.path / "samples.jsonl", stage.path / "records.jsonl"

    # 2. The SFT model samples K answers per prompt.
    sampled = {s["id"]: s for s in read_jsonl(samples_path, repair=True)}
    todo = [p for p in prompts if p.id not in sampled]
    if todo:
        policy = open_policy(cfg, str(sft_dir))  # in this process, or on policy.base_url
        k = cfg.prefs.samples_per_prompt
        sampling = dict(
            max_new_tokens=cfg.prefs.max_new_tokens or cfg.policy.max_new_tokens,
            temperature=cfg.prefs.temperature,
            top_p=cfg.policy.top_p,
        )
        per_batch = max(1, cfg.policy.batch_size // k)
        already = len(sampled)
        try:
            with JsonlWriter(samples_path) as writer:
                for start in range(0, len(todo), per_batch):
                    batch = todo[start : start + per_batch]
                    print(f"[prefs] sampling answers for prompts {already + start + 1}-{already + start + len(batch)} of {len(prompts)}")
                    requests = [
                        GenerateRequest(policy_input(templates, p.text, cfg.policy.system_prompt), sample_index=s, **sampling)
                        for p in batch
                        for s in range(k)
                    ]
                    answers = policy.generate(requests)
                    for n, p in enumerate(batch):
                        own = answers[n * k : (n + 1) * k]
                        record = {
                            "id": p.id,
                            "kind": p.kind,
                            "prompt": p.text,
                            "answers": [a.text or "" for a in own],
                            "statuses": [a.status for a in own],
                            "policy": str(sft_dir),
                        }
                        writer.write(record)
                        sampled[p.id] = record
        finally:
            close_policy(policy, stage.path)  # a server's usage -> policy_usage.json
        del policy

    # 3. Pairs of distinct, non-empty answers.
    pairs, skipped = [], {"empty_answer": 0, "identical_answers": 0}
    for p in prompts:
        sample = sampled[p.id]
        own, dropped = form_pairs(sample)
        for key in skipped:
            skipped[key] += dropped[key]
        pairs += [dict(pair, prompt_id=p.id, kind=p.kind, prompt=p.text) for pair in own]

    # 4. The labeler judges the pairs not yet recorded, a batch at a time.
    labeled = {r["id"] for r in read_jsonl(records_path, repair=True)}
    todo_pairs = [pair for pair in pairs if pair["id"] not in labeled]
    labeler = build_labeler(cfg, role="choices") if todo_pairs else None
    per_call = max(1, choices.batch_size)
    try:
        with JsonlWriter(records_path) as writer:
            for start in range(0, len(todo_pairs), per_call):
                batch = todo_pairs[start : start + per_call]
                print(f"[prefs] labeling pairs {len(labeled) + start + 1}-{len(labeled) + start + len(batch)} of {len(pairs)}")
                items = [
                    PairItem(pair["id"], conversation(pair["prompt"], None, cfg.policy.system_prompt), pair["first"], pair["second"])
                    for pair in batch
                ]
                verdicts = judge_pairs(labeler, items, constitution, templates, cfg)
                if start == 0:  # a labeler that cannot answer choices stops here, its batch unwritten
                    check_labeler_reads(verdicts, labeler.id, labeler.usage.extra.get("choice_asked"),
                                        cfg.labeler.choice_method)
                for pair, verdict in zip(batch, verdicts):
                    writer.write(
                        {
                            "id": pair["id"],
                            "prompt_id": pair["prompt_id"],
                            "kind": pair["kind"],
                            "prompt": pair["prompt"],
                            "answers": [pair["first"], pair["second"]],
                            "answer_indices": pair["indices"],
                            **verdict.as_dict(),
                            "labeler": labeler.id,
                            "chain_of_thought": cfg.prefs.chain_of_thought,
                        }
                    )
    finally:
        if labeler is not None:
            atomic_write_json(stage.path / "labeler_usage.json", {"labeler": labeler.id, **labeler.usage.as_dict()})
            labeler.close()

    # 5. The preference dataset, in TRL's conversational format with the soft label.
    import datasets

    records = read_jsonl(records_path)
    rows = [to_preference_row(r, templates, cfg.policy.system_prompt) for r in records if r["status"] == "ok"]
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
        "position_flip_rate": _flip_rate(principle_rows),
        "chain_of_thought": cfg.prefs.chain_of_thought,
    }
    atomic_write_json(stage.path / "summary.json", summary)
    return stage.finish(
        f"{len(prompts)} prompts, {len(records)} pairs labeled by {summary['principle_questions']} principle questions, "
        f"{len(rows)} dataset rows (mean P(chosen better) {summary['mean_label_prob']:.2f})"
    )


def _flip_rate(principle_rows: list[dict]) -> float | None:
    ok = [e for e in principle_rows if e["status"] == "ok"]
    if not ok:
        return None
    return sum(position_flip(e["orders"]["ab"]["p_first"], e["orders"]["ba"]["p_first"]) for e in ok) / len(ok)
