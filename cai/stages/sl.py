"""Stage 1, SL-CAI (Bai et al. 2022, section 3): critiques and revisions become the fine-tuning data.

1. Load the constitution, the templates and the SL split of the prompts.
2. Load the policy and the labeler (one copy of the weights when they are the same local model).
3. For each batch of red-team prompts not yet recorded:
   a. the policy writes a first answer;
   b. for each of `sl.rounds` rounds, a critique principle is drawn (seeded by prompt and round),
      the labeler critiques the latest answer against it, then revises the answer;
   c. one record per prompt is appended, with every round's principle, critique and revision.
4. Helpful prompts (`sl.helpful_ratio` per red-team prompt) are answered by the policy and kept as
   they are, so that fine-tuning on revisions does not teach the model to refuse everything.
5. The final answers become `sl/dataset/`, conversational `messages` that TRL's SFTTrainer takes.
"""

from __future__ import annotations

import random
from pathlib import Path

from cai.config import Config
from cai.constitution import Constitution, load_constitution
from cai.errors import CaiError
from cai.labelers import GenerateRequest, Labeler, build_labeler, require_writer
from cai.labelers.local import LocalGenerator
from cai.promptsets import Prompt, split_prompts
from cai.records import JsonlWriter, atomic_write_json, read_jsonl, record_labeler_usage, save_dataset
from cai.stages import open_stage
from cai.templates import Templates


def draw_principle(constitution: Constitution, seed: int, prompt_id: str, round_index: int):
    """The principle for one round: seeded by (seed, prompt, round), so it does not depend on batching
    or on where a resumed run picked up."""
    return random.Random(f"{seed}:{prompt_id}:{round_index}").choice(constitution.critiques)


def few_shot_turns(constitution: Constitution, templates: Templates, step: str) -> list[dict]:
    """The constitution's examples as earlier conversation turns, for `step` = critique | revision."""
    turns = []
    for ex in constitution.examples.critique:
        principle = constitution.critique(ex.principle_id) if ex.principle_id else constitution.critiques[0]
        variables = dict(prompt=ex.prompt, response=ex.response, critique_request=principle.critique)
        if step == "revision":
            variables.update(critique=ex.critique, revision_request=principle.revision)
        turns.append({"role": "user", "content": templates.render(f"{step}.jinja", **variables)})
        turns.append({"role": "assistant", "content": ex.critique if step == "critique" else ex.revision})
    return turns


def clean_revision(text: str) -> str:
    """Drop the labels and quotes small models like to wrap a rewrite in."""
    text = text.strip()
    for prefix in ("Revision:", "Revised response:", "Rewritten response:", "Assistant:"):
        if text.lower().startswith(prefix.lower()):
            text = text[len(prefix) :].strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return text


def critique_and_revise(
    prompts: list[Prompt],
    answers: list[str],
    labeler: Labeler,
    constitution: Constitution,
    templates: Templates,
    cfg: Config,
) -> list[list[dict]]:
    """Run `cfg.sl.rounds` critique→revision rounds on a batch; returns each prompt's rounds."""
    shots = {
        step: few_shot_turns(constitution, templates, step) if cfg.sl.few_shot else []
        for step in ("critique", "revision")
    }
    sampling = dict(max_new_tokens=cfg.labeler.max_new_tokens, temperature=cfg.labeler.temperature, top_p=cfg.labeler.top_p)
    current = list(answers)
    rounds: list[list[dict]] = [[] for _ in prompts]
    for r in range(cfg.sl.rounds):
        principles = [draw_principle(constitution, cfg.seed, p.id, r) for p in prompts]
        critique_prompts = [
            templates.render("critique.jinja", prompt=p.text, response=answer, critique_request=pr.critique)
            for p, answer, pr in zip(prompts, current, principles)
        ]
        critiques = labeler.generate(
            [GenerateRequest(shots["critique"] + [{"role": "user", "content": c}], **sampling) for c in critique_prompts],
            desc=f"critique round {r + 1}",
            reject_refusals=True,  # a critic that refuses to critique is asked again, then marked unparseable
        )
        revision_prompts = [
            templates.render(
                "revision.jinja",
                prompt=p.text,
                response=answer,
                critique_request=pr.critique,
                critique=c.text or "",
                revision_request=pr.revision,
            )
            for p, answer, pr, c in zip(prompts, current, principles, critiques)
        ]
        revisions = labeler.generate(
            [GenerateRequest(shots["revision"] + [{"role": "user", "content": c}], **sampling) for c in revision_prompts],
            desc=f"revision round {r + 1}",
        )
        for i, (pr, c, v) in enumerate(zip(principles, critiques, revisions)):
            revised = clean_revision(v.text or "") if v.status == "ok" else ""
            rounds[i].append(
                {
                    "round": r + 1,
                    "principle_id": pr.id,
                    "critique_request": pr.critique,
                    "critique": c.text,
                    "critique_status": c.status,
                    "revision_request": pr.revision,
                    "revision": revised or v.text,
                    "revision_status": v.status if revised else ("unparseable" if v.status == "ok" else v.status),
                }
            )
            # A failed or empty revision leaves the answer as it was; the record says so.
            if revised and c.status == "ok":
                current[i] = revised
    return rounds


def to_messages(prompt: str, answer: str, system_prompt: str | None) -> list[dict]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def run(cfg: Config) -> Path:
    # 1. Constitution, templates, prompts — all checked before anything is written.
    constitution = load_constitution(cfg.constitution)
    templates = Templates(cfg.templates)
    splits = split_prompts(cfg.data, cfg.seed)
    red_team = splits["sl"]["red_team"]
    helpful = splits["sl"]["helpful"][: round(cfg.sl.helpful_ratio * len(red_team))]
    if not red_team:
        raise CaiError("data: the sl split has no red-team prompts; add prompts or raise data.fractions.sl")
    from cai.models import resolve_model

    require_writer(cfg, "text", "critiques and revisions")
    resolve_model(cfg.policy.model, cfg.cache_dir)
    if cfg.labeler.backend == "local":
        resolve_model(cfg.labeler.model, cfg.cache_dir)

    stage = open_stage(cfg, "sl")
    if stage.done:
        return stage.path
    records_path = stage.path / "records.jsonl"
    done_ids = {r["id"] for r in read_jsonl(records_path, repair=True)}
    todo = [p for p in red_team + helpful if p.id not in done_ids]

    # 2. Policy and labeler.
    from cai.models import load_model_and_tokenizer

    shared: dict = {}
    labeler = None
    if todo:
        model, tokenizer = load_model_and_tokenizer(cfg.policy.model, cfg, shared)
        policy = LocalGenerator(model, tokenizer, cfg.policy.batch_size, cfg.seed, cfg.policy.system_prompt)
        if any(p.kind == "red_team" for p in todo):
            labeler = build_labeler(cfg, shared_models=shared)
    answer_sampling = dict(max_new_tokens=cfg.policy.max_new_tokens, temperature=cfg.policy.temperature, top_p=cfg.policy.top_p)

    # 3.–4. Batches of prompts: first answers, then (red-team only) critique and revision rounds.
    batch_size = max(cfg.policy.batch_size, cfg.labeler.batch_size)
    try:
        with JsonlWriter(records_path) as writer:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                print(f"[sl] prompts {len(done_ids) + start + 1}-{len(done_ids) + start + len(batch)} of {len(red_team) + len(helpful)}")
                first = policy.generate(
                    [GenerateRequest([{"role": "user", "content": templates.render("answer.jinja", prompt=p.text)}], **answer_sampling) for p in batch],
                    desc="policy answers",
                )
                answers = [g.text or "" for g in first]
                red_index = [i for i, p in enumerate(batch) if p.kind == "red_team"]
                rounds_by_index = {}
                if red_index:
                    rounds = critique_and_revise(
                        [batch[i] for i in red_index], [answers[i] for i in red_index], labeler, constitution, templates, cfg
                    )
                    rounds_by_index = dict(zip(red_index, rounds))
                for i, p in enumerate(batch):
                    rounds = rounds_by_index.get(i, [])
                    final = answers[i]
                    for rnd in rounds:
                        if rnd["revision_status"] == "ok" and rnd["critique_status"] == "ok":
                            final = rnd["revision"]
                    writer.write(
                        {
                            "id": p.id,
                            "kind": p.kind,
                            "prompt": p.text,
                            "initial": answers[i],
                            "initial_status": first[i].status,
                            "rounds": rounds,
                            "final": final,
                            "revised": any(r["revision_status"] == "ok" and r["critique_status"] == "ok" for r in rounds),
                            "policy": cfg.policy.model,
                            "labeler": labeler.id if (labeler and rounds) else None,
                        }
                    )
    finally:
        if labeler is not None:
            record_labeler_usage(stage.path, labeler)
            labeler.close()

    # 5. The SL-CAI dataset: every prompt with a non-empty final answer.
    import datasets

    records = read_jsonl(records_path)
    rows = [r for r in records if r["final"].strip()]
    dataset = datasets.Dataset.from_dict(
        {
            "messages": [to_messages(r["prompt"], r["final"], cfg.policy.system_prompt) for r in rows],
            "kind": [r["kind"] for r in rows],
            "id": [r["id"] for r in rows],
        }
    )
    save_dataset(dataset, stage.path / "dataset")
    n_red = sum(r["kind"] == "red_team" for r in records)
    n_revised = sum(r["revised"] for r in records)
    counts = {
        "red_team": n_red,
        "helpful": len(records) - n_red,
        "revised": n_revised,
        "rounds": cfg.sl.rounds,
        "critiques_failed": sum(rnd["critique_status"] != "ok" for r in records for rnd in r["rounds"]),
        "revisions_failed": sum(rnd["revision_status"] != "ok" for r in records for rnd in r["rounds"]),
        "dataset_rows": len(rows),
    }
    atomic_write_json(stage.path / "summary.json", counts)
    return stage.finish(
        f"{n_red} red-team prompts ({n_revised} revised over {cfg.sl.rounds} round(s)), "
        f"{counts['helpful']} helpful, {len(rows)} dataset rows"
    )
