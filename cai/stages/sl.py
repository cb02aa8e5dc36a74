"""Stage 1, SL-CAI (Bai et al. 2022, section 3): critiques and revisions become the fine-tuning data.

1. Load the constitution, the templates and the SL split of the prompts.
2. Load the policy and the labeler (one copy of the weights when they are the same local model).
3. For each batch of red-team prompts not yet recorded:
   a. the policy writes a first answer;
   b. for each of `sl.rounds` rounds, a critique principle is drawn (seeded by prompt and round; one
      whose check does not apply to the prompt is passed over; with `sl.critique_failed_checks`, one whose
      check the answer already satisfies too),
      the labeler critiques the latest answer against it, then revises the answer;
   c. with `sl.verify_revisions`, a revision replaces the answer only when the choice labeler prefers
      it to the answer it replaces under that round's principle, asked in both orders (with checks
      the verdict is exact); the round records the verdict, and `summary.json` counts those turned down;
      with `sl.revision_candidates` N > 1 the labeler writes N revisions and the one preferred most
      is the one that may replace the answer (a weak reviser that gets it right one time in N);
   d. one record per prompt is appended, with every round's principle, critique and revision.
4. Helpful prompts (`sl.helpful_ratio` per red-team prompt) are answered by the policy and kept as
   they are, so that fine-tuning on revisions does not teach the model to refuse everything.
5. The final answers become `sl/dataset/`, conversational `messages` that TRL's SFTTrainer takes; with
   `sl.drop_unrevised`, a red-team prompt that no round revised is left out (its first answer is what the
   critique found wanting, and with a weak reviser most of them are compliant answers to harmful requests).
"""

from __future__ import annotations

import random
from pathlib import Path

from cai.chat import conversation, policy_input
from cai.config import Config
from cai.constitution import Constitution, load_constitution
from cai.errors import CaiError
from cai.labelers import GenerateRequest, Labeler, build_labeler, require_writer
from cai.policy_server import check_policy, close_policy, open_policy
from cai.promptsets import Prompt, split_prompts
from cai.records import JsonlWriter, atomic_write_json, read_jsonl, record_labeler_usage, save_dataset
from cai.stages import is_current, open_stage
from cai.templates import Templates


def draw_principle(constitution: Constitution, seed: int, prompt_id: str, round_index: int, prompt: Prompt | None = None,
                   answer: str | None = None):
    """The principle for one round: seeded by (seed, prompt, round), so it does not depend on batching
    or on where a resumed run picked up. Given the `prompt`, a principle whose check does not apply to it
    (a `when` on the other kind of prompt) is not drawn, unless none applies; given the `answer` too
    (`sl.critique_failed_checks`), it is drawn among the principles whose check the answer fails, when
    there are any."""
    candidates = constitution.critiques
    if prompt is not None:
        from cai.checks import compile_check

        checks = {c.id: compile_check(c.check) for c in candidates if c.check is not None}
        applicable = [c for c in candidates if c.id not in checks or checks[c.id].applies_to(prompt.text, prompt.kind)]
        candidates = applicable or candidates
        if answer is not None:
            failed = [c for c in candidates if c.id in checks and checks[c.id].satisfied(prompt.text, answer, prompt.kind) is False]
            candidates = failed or candidates
    return random.Random(f"{seed}:{prompt_id}:{round_index}").choice(candidates)


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
    verifier: Labeler | None = None,
) -> list[list[dict]]:
    """Run `cfg.sl.rounds` critique→revision rounds on a batch; returns each prompt's rounds.

    With a `verifier`, a round's revision is kept only when it judges it better than the answer it
    would replace (`verify`)."""
    shots = {
        step: few_shot_turns(constitution, templates, step) if cfg.sl.few_shot else []
        for step in ("critique", "revision")
    }
    sampling = dict(max_new_tokens=cfg.labeler.max_new_tokens, temperature=cfg.labeler.temperature, top_p=cfg.labeler.top_p)
    current = list(answers)
    rounds: list[list[dict]] = [[] for _ in prompts]
    for r in range(cfg.sl.rounds):
        principles = [draw_principle(constitution, cfg.seed, p.id, r, p, answer if cfg.sl.critique_failed_checks else None)
                      for p, answer in zip(prompts, current)]
        critique_prompts = [
            templates.render("critique.jinja", prompt=p.text, response=answer, critique_request=pr.critique)
            for p, answer, pr in zip(prompts, current, principles)
        ]
        # Each round is a new draw: the round is in the sample index, which the seed and the answer cache
        # both key on. Without it a round that meets the same answer under the same principle (the usual
        # case for a revision the verifier turned down, with sl.critique_failed_checks) would be served
        # round 1's critique and revisions again from the cache: on the demo 12 of 13 such prompts were.
        critiques = labeler.generate(
            [GenerateRequest(shots["critique"] + [{"role": "user", "content": c}], sample_index=r, **sampling)
             for c in critique_prompts],
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
        n = cfg.sl.revision_candidates  # > 1 only with a verifier, which picks among them
        written = labeler.generate(
            [GenerateRequest(shots["revision"] + [{"role": "user", "content": c}], sample_index=r * n + j, **sampling)
             for c in revision_prompts for j in range(n)],
            desc=f"revision round {r + 1}",
        )
        candidates = [written[i * n : (i + 1) * n] for i in range(len(prompts))]
        texts = [[clean_revision(v.text or "") if v.status == "ok" else "" for v in own] for own in candidates]
        verdicts: list = [None] * len(prompts)
        chosen = [0] * len(prompts)  # which candidate each item keeps (or shows, when all are turned down)
        candidate_verdicts: list[list] = [[None] * n for _ in prompts]
        if verifier is not None:
            asked = [(i, j) for i, c in enumerate(critiques) for j, t in enumerate(texts[i])
                     if t and c.status == "ok" and t.strip() != current[i].strip()]
            found = verify(verifier, [prompts[i] for i, _ in asked], [texts[i][j] for i, j in asked], [current[i] for i, _ in asked],
                           [principles[i] for i, _ in asked], r, constitution, templates, cfg) if asked else []
            for (i, j), p in zip(asked, found):
                candidate_verdicts[i][j] = p
            for i, own in enumerate(candidate_verdicts):
                scored = [(p, j) for j, p in enumerate(own) if p is not None]
                if scored:
                    verdicts[i], chosen[i] = max(scored, key=lambda x: (x[0], -x[1]))  # the first of the best
        revisions = [candidates[i][chosen[i]] for i in range(len(prompts))]
        revised_texts = [texts[i][chosen[i]] for i in range(len(prompts))]
        for i, (pr, c, v) in enumerate(zip(principles, critiques, revisions)):
            revised = revised_texts[i]
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
            if verifier is not None:
                # P(revision better) in both orders; None when not asked (nothing to verify, or the same text)
                accepted = verdicts[i] is not None and verdicts[i] > 0.5
                rounds[i][-1].update(verified_p=verdicts[i], accepted=bool(revised and c.status == "ok" and accepted))
                if n > 1:
                    rounds[i][-1]["candidates"] = [{"revision": t, "verified_p": p} for t, p in zip(texts[i], candidate_verdicts[i])]
                if revised and c.status == "ok" and not accepted:
                    continue
            # A failed or empty revision leaves the answer as it was; the record says so.
            if revised and c.status == "ok":
                current[i] = revised
    return rounds


def check_templates(constitution: Constitution, templates: Templates, cfg: Config) -> None:
    """Render every template the stage uses once, with the variables it passes, so that a broken one
    fails here, in one line, before a model loads."""
    policy_input(templates, "x", cfg.policy.system_prompt)
    principle = constitution.critiques[0]
    templates.render("critique.jinja", prompt="x", response="y", critique_request=principle.critique)
    templates.render("revision.jinja", prompt="x", response="y", critique_request=principle.critique, critique="z",
                     revision_request=principle.revision)
    if cfg.sl.few_shot:
        for step in ("critique", "revision"):
            few_shot_turns(constitution, templates, step)


def verify(verifier: Labeler, prompts: list[Prompt], revisions: list[str], answers: list[str], principles: list,
           round_index: int, constitution: Constitution, templates: Templates, cfg: Config) -> list[float | None]:
    """P(revision is better than the answer it replaces) under each round's principle, both orders.

    The principle's comparison twin (the comparison principle with the same id) is asked when there is
    one, else its critique request as the question; its check goes with it either way.
    """
    from cai.constitution import ComparisonPrinciple
    from cai.preferences import JudgeSettings, PairItem, judge_pairs

    by_id = {c.id: c for c in constitution.comparisons}
    out: list[float | None] = [None] * len(prompts)
    for principle_id in dict.fromkeys(pr.id for pr in principles):  # one call per principle, its items batched
        indices = [i for i, pr in enumerate(principles) if pr.id == principle_id]
        pr = principles[indices[0]]
        question = by_id.get(pr.id) or ComparisonPrinciple(id=pr.id, question=f"Which response does better on this: {pr.critique}", check=pr.check)
        settings = JudgeSettings(principles_per_pair=1, few_shot=False, seed=cfg.seed, principles=(question,))
        items = [PairItem(f"{prompts[i].id}:round{round_index + 1}", conversation(prompts[i].text, None, cfg.policy.system_prompt),
                          revisions[i], answers[i]) for i in indices]
        for i, verdict in zip(indices, judge_pairs(verifier, items, constitution, templates, settings=settings, desc="verifying revisions")):
            out[i] = verdict.label
    return out


def run(cfg: Config) -> Path:
    # 1. Constitution, templates, prompts — all checked before anything is written.
    constitution = load_constitution(cfg.constitution)
    templates = Templates(cfg.templates)
    splits = split_prompts(cfg.data, cfg.seed)
    red_team = splits["sl"]["red_team"]
    helpful = splits["sl"]["helpful"][: round(cfg.sl.helpful_ratio * len(red_team))]
    if not red_team:
        raise CaiError("data: the sl split has no red-team prompts; add prompts or raise data.fractions.sl")
    check_templates(constitution, templates, cfg)
    from cai.models import resolve_model

    require_writer(cfg, "text", "critiques and revisions")
    if not is_current(cfg, "sl"):  # a finished stage samples nothing: no server needed
        check_policy(cfg, cfg.policy.model)  # its weights here, or a server at policy.base_url serving it
    if cfg.labeler.backend == "local":
        resolve_model(cfg.labeler.model, cfg.cache_dir)

    stage = open_stage(cfg, "sl", uses_labeler=("text", "choices") if cfg.sl.verify_revisions else ("text",))
    if stage.done:
        return stage.path
    records_path = stage.path / "records.jsonl"
    done_ids = {r["id"] for r in read_jsonl(records_path, repair=True)}
    todo = [p for p in red_team + helpful if p.id not in done_ids]

    # 2. Policy (in this process or on policy.base_url) and labeler.
    shared: dict = {}
    labeler = verifier = policy = None
    if todo:
        policy = open_policy(cfg, cfg.policy.model, shared)
        if any(p.kind == "red_team" for p in todo):
            labeler = build_labeler(cfg, shared_models=shared)
            if cfg.sl.verify_revisions:
                verifier = build_labeler(cfg, shared_models=shared, role="choices")
    answer_sampling = dict(max_new_tokens=cfg.policy.max_new_tokens, temperature=cfg.policy.temperature, top_p=cfg.policy.top_p)

    # 3.–4. Batches of prompts: first answers, then (red-team only) critique and revision rounds.
    batch_size = max(cfg.policy.batch_size, cfg.labeler.batch_size)
    try:
        with JsonlWriter(records_path) as writer:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                print(f"[sl] prompts {len(done_ids) + start + 1}-{len(done_ids) + start + len(batch)} of {len(red_team) + len(helpful)}")
                first = policy.generate(
                    [GenerateRequest(policy_input(templates, p.text, cfg.policy.system_prompt), **answer_sampling) for p in batch],
                    desc="policy answers",
                )
                answers = [g.text or "" for g in first]
                red_index = [i for i, p in enumerate(batch) if p.kind == "red_team"]
                rounds_by_index = {}
                if red_index:
                    rounds = critique_and_revise(
                        [batch[i] for i in red_index], [answers[i] for i in red_index], labeler, constitution, templates, cfg,
                        verifier=verifier,
                    )
                    rounds_by_index = dict(zip(red_index, rounds))
                for i, p in enumerate(batch):
                    rounds = rounds_by_index.get(i, [])
                    final = answers[i]
                    for rnd in rounds:
                        if rnd["revision_status"] == "ok" and rnd["critique_status"] == "ok" and rnd.get("accepted", True):
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
                            "revised": any(r["revision_status"] == "ok" and r["critique_status"] == "ok" and r.get("accepted", True)
                                           for r in rounds),
                            "policy": cfg.policy.model,
                            "labeler": labeler.id if (labeler and rounds) else None,
                        }
                    )
    finally:
        if labeler is not None:
            record_labeler_usage(stage.path, labeler)
            labeler.close()
        if policy is not None:
            close_policy(policy, stage.path)  # a server's usage -> policy_usage.json
        if verifier is not None:
            verifier.close()

    # 5. The SL-CAI dataset: every prompt with a non-empty final answer (less the unrevised red-team ones,
    #    with sl.drop_unrevised).
    import datasets

    records = read_jsonl(records_path)
    dropped = {r["id"] for r in records if r["kind"] == "red_team" and not r["revised"]} if cfg.sl.drop_unrevised else set()
    rows = [r for r in records if r["final"].strip() and r["id"] not in dropped]
    dataset = datasets.Dataset.from_dict(
        {
            # the policy's input exactly as it was sampled, so SFT trains on what the policy is asked
            "messages": [policy_input(templates, r["prompt"], cfg.policy.system_prompt, r["final"]) for r in rows],
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
        "unrevised_dropped": len(dropped),
        "verify_revisions": cfg.sl.verify_revisions,
        "revisions_turned_down": sum(rnd.get("accepted") is False and rnd["revision_status"] == "ok" and rnd["critique_status"] == "ok"
                                     for r in records for rnd in r["rounds"]),
    }
    atomic_write_json(stage.path / "summary.json", counts)
    return stage.finish(
        f"{n_red} red-team prompts ({n_revised} revised over {cfg.sl.rounds} round(s)), "
        f"{counts['helpful']} helpful, {len(rows)} dataset rows"
    )
