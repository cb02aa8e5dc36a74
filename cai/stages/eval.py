"""Stage 6, evaluation: did the constitution work? AI judges compare the models on prompts no stage saw.

1. Check everything first: the stages whose models are compared (`eval.models`: initial = policy.model,
   sft = the SL-CAI model, rl = the RL policy) are done; the prompt files named in `eval.prompts` hold
   a `prompt` field; the templates render. The eval split of the prompts (red-team and helpful) was
   held out of every earlier stage.
2. Each model answers every prompt (`eval.temperature`); one record per answer is appended to
   `eval/answers.jsonl` per batch, with its length and its log-probability under the model and under
   the SL-CAI model (the RL stage's reference), so KL(model || reference) needs no second pass. The
   final policy also answers the prompts of a few SL-CAI records, for the report's example table.
   With `policy.base_url` the answers are sampled on that server, each model asked for under its
   served name (`eval.served_models`), and only scored here: the log-probabilities come from a
   forward pass in this process, as OpenAI-compatible servers do not all score a given text. A model
   whose weights are not here (a hub model served remotely) gets a null `logp`, and its KL is n/a.
3. Reward-model scores of every answer as PPO read them (`cai.policy_models.reward_as_ppo_reads_it`;
   skipped, and said so, when `rm/` is missing); with an ensemble reward model (`rm.ensemble`), its
   members' disagreement on each model's answers, a hacking monitor. metrics.json's `reward_agreement`:
   on the pairs the judge decides (step 4), how often the reward model scores the judge's pick higher.
   b. The over-optimisation curve (Gao et al. 2022): each policy snapshot the RL stage kept
      (`rl.keep_snapshots`, every `rl.checkpoint_every` steps) answers the eval prompts too; the proxy
      (reward-model score) and the gold (the checks' compliance) of each against its KL to the SL-CAI
      model show where more RL stopped helping.
4. Pairwise comparisons (rl vs initial, rl vs sft, sft vs initial) judged by the judge, `eval.judge`
   (a whole labeler config; by default the training labeler, and then the report says the evaluation
   is circular), with the prefs stage's machinery (`cai.preferences.judge_pairs`: each principle in
   both orders, un-flipped, averaged). One record per pair goes to `eval/judgements.jsonl` per batch.
   With an independent judge, the training labeler judges the same pairs
   (`eval/training_labeler_judgements.jsonl`): the held-out-judge audit (`cai.judging.agreement`).
5. Harmlessness of the red-team answers and refusals of the helpful ones, asked of the judge as
   (A)/(B) questions in both orders (`prompts/harmlessness.jinja`, `prompts/refusal.jinja`) and
   un-flipped the same way -> `eval/grades.jsonl`.
6. The labeler audit: an existing one (`cai audit-labeler`), or a seeded sample of `eval.audit_pairs`.
7. Aggregate (`cai.eval_metrics`: win rates with bootstrap intervals over prompts; with checks, each
   answer's compliance, exactly) -> `eval/metrics.json`,
   `eval/samples.jsonl` (each prompt with every model's answer and the judgements).
   b. Prompts written by `cai redteam` carry their principle and attack style: each model's attack
      success per principle and per style (`cai.redteam.attack_success`).
8. The report (`cai.report`): `eval/report.html` (self-contained) and `eval/report.md`.

A killed run resumes: answers, judgements and grades already on disk are not asked for again, and
the labeler's answer cache covers the batch that was in flight.
"""

from __future__ import annotations

import gc
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

from cai.chat import policy_input
from cai.config import Config
from cai.constitution import load_constitution
from cai.errors import CaiError
from cai.eval_metrics import aggregate, prompt_counts
from cai.judging import (
    GRADES,
    PAIRS,
    agreement,
    check_compliance,
    grade_answers,
    grade_requests,
    judge_comparisons,
    pending_grades,
    pending_pairs,
)
from cai.labelers import GenerateRequest, build_labeler, circular_judge, labeler_config, role_key
from cai.labelers.local import LocalGenerator
from cai.policy_server import check_policy, close_policy, open_policy
from cai.promptsets import Prompt, load_prompt_file, prompt_files, split_prompts, training_overlap
from cai.records import DONE, JsonlWriter, atomic_write_json, atomic_write_text, read_jsonl
from cai.stages import is_current, open_stage, require_done, stage_dir
from cai.templates import Templates

EVAL_SPLIT = "eval split"


# -------------------------------------------------------------------------------------------------
# 1. Prompts and models


def eval_prompts(cfg: Config) -> list[tuple[Prompt, str]]:
    """(prompt, set name) for the held-out eval split and each file in `eval.prompts`, without repeats."""
    splits = split_prompts(cfg.data, cfg.seed)
    split = splits["eval"]
    sets = [(f"{EVAL_SPLIT} ({kind.replace('_', '-')})", split[kind]) for kind in ("red_team", "helpful")]
    for path, kind in prompt_files(cfg.eval.prompts):
        prompts = load_prompt_file(path, kind)
        shared = training_overlap(splits, prompts)
        if shared:
            print(f"[eval] warning: {path}: {len(shared)} of its {len(prompts)} prompts are in the training splits "
                  f"(sl/prefs/rl, or val, which selects the RL snapshot), so they are not held out; e.g. {shared[0].text[:60]!r}")
        sets.append((Path(path).name, prompts))
    seen, out = set(), []
    for name, prompts in sets:
        for p in prompts[: cfg.eval.limit]:
            if p.id not in seen:
                seen.add(p.id)
                out.append((p, name))
    if not out:
        raise CaiError("data: the eval split has no prompts; add prompts, raise data.fractions.eval or name eval.prompts files")
    return out


def model_sources(cfg: Config) -> dict[str, str]:
    """What each compared model is loaded from; a missing stage output is one line naming the stage."""
    sources = {}
    for name in dict.fromkeys(cfg.eval.models):
        sources[name] = cfg.policy.model if name == "initial" else str(require_done(cfg, name, "eval"))
    if len(sources) < 1:
        raise CaiError("eval.models is empty; name at least one of initial, sft, rl")
    return sources


def served_names(cfg: Config, sources: dict[str, str]) -> dict[str, str]:
    """The name each model is asked for on `policy.base_url`: `eval.served_models`, else policy.served_model
    or policy.model for initial, and the model's folder for the others (vLLM names a model by its path)."""
    names = {}
    for name, source in sources.items():
        default = (cfg.policy.served_model or source) if name == "initial" else source
        names[name] = cfg.eval.served_models.get(name, default)
    return names


def files_digest(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode() + b"\0" + Path(path).expanduser().read_bytes())
    return digest.hexdigest()[:16]


# -------------------------------------------------------------------------------------------------
# 2. Answers and their log-probabilities


def answer_logprobs(generator: LocalGenerator, messages: list[list[dict]], answers: list[str], temperature: float) -> list[float]:
    """Sum of the answer tokens' log-probabilities under `generator.model` (at `temperature`)."""
    import torch

    from cai.rl import logprobs_from_logits

    tok = generator.tokenizer
    rows = []
    for m, a in zip(messages, answers):
        prefix = tok(generator.render(m), add_special_tokens=False)["input_ids"]
        rows.append((prefix, tok(a, add_special_tokens=False)["input_ids"]))
    out = [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -sum(map(len, rows[i])))
    with torch.no_grad():
        for start in range(0, len(order), generator.batch_size):
            batch = [i for i in order[start : start + generator.batch_size] if rows[i][1]]
            if not batch:
                continue
            width = max(len(rows[i][0]) + len(rows[i][1]) for i in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(batch):
                full = rows[i][0] + rows[i][1]
                ids[r, : len(full)], mask[r, : len(full)] = torch.tensor(full), 1
            logits = generator.model(input_ids=ids.to(generator.device), attention_mask=mask.to(generator.device)).logits
            for r, i in enumerate(batch):
                p, n = len(rows[i][0]), len(rows[i][1])
                picked = logprobs_from_logits(logits[r, p - 1 : p + n - 1][None], ids[r, p : p + n][None].to(logits.device), temperature)
                out[i] = float(picked.sum())
    return out


def load_generator(source: str, cfg: Config) -> LocalGenerator:
    from cai.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(source, cfg, None)
    return LocalGenerator(model, tokenizer, eval_batch_size(cfg), cfg.seed, cfg.policy.system_prompt)


def eval_batch_size(cfg: Config) -> int:
    return cfg.eval.batch_size or cfg.policy.batch_size


def pick_examples(sl_dir: Path, n: int) -> list[dict]:
    """The first `n` red-team SL-CAI records (by id, revised ones first): the report's example table."""
    records = [r for r in read_jsonl(sl_dir / "records.jsonl") if r["kind"] == "red_team" and r["rounds"]]
    records.sort(key=lambda r: (not r.get("revised"), r["id"]))
    return records[:n]


@contextmanager
def answering(cfg: Config, model_name: str, source: str, reference: LocalGenerator | None, usage_dir: Path):
    """(sampler, scorer) of one model. The sampler draws its answers: on `policy.base_url` when that is
    set (no weights loaded for it; its usage is added to `usage_dir`/policy_usage.json), else in this
    process. The scorer gives their log-probabilities: the model in this process, or None when it
    samples on a server and its weights are not here."""
    if not cfg.policy.base_url:
        generator = reference if (model_name == "sft" and reference is not None) else load_generator(source, cfg)
        yield generator, generator
        return
    from cai.models import weights_here

    sampler = open_policy(cfg, source, served_model=served_names(cfg, {model_name: source})[model_name],
                          name_key=f"eval.served_models.{model_name}")
    try:
        if model_name == "sft" and reference is not None:
            scorer = reference
        elif weights_here(source, cfg.cache_dir):
            scorer = load_generator(source, cfg)
        else:
            scorer = None
            print(f"[eval] {model_name}: the weights of {source} are not here, so its answers' log-probabilities "
                  f"(and KL to the SL-CAI model) are recorded as null")
        yield sampler, scorer
    finally:
        close_policy(sampler, usage_dir)


def write_answers(cfg, templates, sources, prompts, path: Path, examples: list[dict], examples_path: Path) -> None:
    """Every model answers every prompt not yet answered (step 2); the last model answers the examples.
    On a policy server, what each model's sampling sent is added to policy_usage.json beside `path`."""
    done = {(r["model"], r["id"]) for r in read_jsonl(path, repair=True)}
    sft_dir = stage_dir(cfg, "sft")
    reference_source = str(sft_dir) if is_current(cfg, "sft") else None
    final = next((m for m in ("rl", "sft", "initial") if m in sources), None)  # the newest model shows the examples
    todo = {m: [(p, s) for p, s in prompts if (m, p.id) not in done] for m in sources}
    need_examples = bool(examples) and not examples_path.exists()
    if not any(todo.values()) and not need_examples:
        return
    sampling = dict(
        max_new_tokens=cfg.eval.max_new_tokens or cfg.policy.max_new_tokens, temperature=cfg.eval.temperature, top_p=cfg.policy.top_p
    )
    temperature = cfg.eval.temperature if cfg.eval.temperature > 0 else 1.0
    reference = load_generator(reference_source, cfg) if reference_source and any(todo.values()) else None
    ask = lambda text: policy_input(templates, text, cfg.policy.system_prompt)  # noqa: E731
    # A server takes a batch as concurrent requests: one record write per `concurrency` answers, not per 8.
    batch_size = max(eval_batch_size(cfg), cfg.policy.concurrency) if cfg.policy.base_url else eval_batch_size(cfg)
    with JsonlWriter(path) as writer:
        for model_name, source in sources.items():
            if not todo[model_name] and not (model_name == final and need_examples):
                continue
            with answering(cfg, model_name, source, reference, path.parent) as (sampler, scorer):
                rows = todo[model_name]
                for start in range(0, len(rows), batch_size):
                    batch = rows[start : start + batch_size]
                    print(f"[eval] {model_name} answers prompts {len(prompts) - len(rows) + start + 1}-"
                          f"{len(prompts) - len(rows) + start + len(batch)} of {len(prompts)}")
                    messages = [ask(p.text) for p, _ in batch]
                    generations = sampler.generate([GenerateRequest(m, **sampling) for m in messages])
                    answers = [g.text or "" for g in generations]
                    logp = answer_logprobs(scorer, messages, answers, temperature) if scorer else [None] * len(batch)
                    if reference is None:
                        logp_ref = [None] * len(batch)
                    else:
                        logp_ref = logp if scorer is reference else answer_logprobs(reference, messages, answers, temperature)
                    # answer length in the model's tokens; the server's count when its tokenizer is not here
                    tokens = [len(scorer.tokenizer(a, add_special_tokens=False)["input_ids"]) if scorer else g.output_tokens
                              for g, a in zip(generations, answers)]
                    for (p, set_name), g, a, n, lp, lr in zip(batch, generations, answers, tokens, logp, logp_ref):
                        writer.write({
                            "model": model_name, "id": p.id, "kind": p.kind, "set": set_name, "prompt": p.text,
                            "answer": a, "status": g.status, "tokens": n, "logp": lp, "logp_ref": lr,
                        })
                if model_name == final and need_examples:
                    print(f"[eval] {model_name} answers the prompts of {len(examples)} SL-CAI examples")
                    generations = sampler.generate([GenerateRequest(ask(r["prompt"]), **sampling) for r in examples])
                    rows_out = [{
                        "id": r["id"], "prompt": r["prompt"], "first_answer": r["initial"],
                        "rounds": [{k: x.get(k) for k in ("principle_id", "critique", "revision", "accepted")} for x in r["rounds"]],
                        "sl_final": r["final"], "policy": model_name, "policy_answer": g.text or "",
                    } for r, g in zip(examples, generations)]
                    atomic_write_text(examples_path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows_out))
            del sampler, scorer  # this model's weights go before the next model's load
            gc.collect()


# -------------------------------------------------------------------------------------------------
# 7b. The over-optimisation curve


def snapshot_sources(cfg: Config) -> dict[str, str]:
    """{"rl@step-N": folder} of the policy snapshots the RL stage kept (rl.keep_snapshots), by step."""
    folder = stage_dir(cfg, "rl") / "snapshots"
    found = sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if folder.is_dir() else []
    return {f"rl@{p.name}": str(p) for p in found}


def curve_snapshots(cfg: Config, constitution) -> dict[str, str]:
    """The RL snapshots the over-optimisation curve samples: none without rl among eval.models or a
    check (the gold). Without a finished reward model (DPO) the proxy is left out."""
    from cai.checks import distinct_checks

    if "rl" not in cfg.eval.models or not distinct_checks(constitution):
        return {}
    return snapshot_sources(cfg)


def overoptimization_curve(cfg, templates, prompts, constitution, answer_rows: dict, rewards: dict | None, path: Path) -> list[dict] | None:
    """Proxy (reward-model score) and gold (the checks' compliance) of the SL-CAI model, each kept RL
    snapshot and the final policy, against their KL to the SL-CAI reference (Gao et al. 2022).

    The snapshots answer the eval prompts like the compared models (their answers are kept in
    `path`, so a resumed run asks nothing twice). None when there is no snapshot or no check to score
    by; the proxy is None without a reward model. A snapshot of the final step (rl.rounds,
    rl.select_by) stands for the final policy, and the snapshot rl/ kept (rl/selection.json) is marked.
    """
    from cai.checks import compliance, distinct_checks

    snapshots = curve_snapshots(cfg, constitution)
    checks = distinct_checks(constitution)
    if not snapshots:
        return None
    write_answers(cfg, templates, snapshots, prompts, path, [], path.with_suffix(".unused"))
    rows = {(r["model"], r["id"]): r for r in read_jsonl(path)}
    from cai.policy_models import reward_as_ppo_reads_it
    from cai.rewards import RewardModelScorer

    reward = reward_as_ppo_reads_it(cfg, RewardModelScorer(stage_dir(cfg, "rm"), cfg.cache_dir)) if rewards else None
    selection = stage_dir(cfg, "rl") / "selection.json"
    kept = json.loads(selection.read_text())["kept"] if selection.exists() else None
    models = ["sft", *snapshots] + ([] if kept or f"rl@step-{cfg.rl.steps}" in snapshots else ["rl"])
    points = []
    for model in models:
        mine = [(p, rows[model, p.id] if model in snapshots else answer_rows.get((model, p.id))) for p, _ in prompts]
        if any(r is None for _, r in mine):
            continue
        if reward is None:
            proxy = None
        elif model in snapshots:
            proxy = reward([p.text for p, _ in mine], [r["answer"] for _, r in mine], [p.kind for p, _ in mine])
        else:
            proxy = [rewards[model, p.id] for p, _ in mine]
        kl = [r["logp"] - r["logp_ref"] for _, r in mine if r.get("logp") is not None and r.get("logp_ref") is not None]
        gold = [float(compliance(checks, p.text, r["answer"], p.kind)["complies"]) for p, r in mine]
        step = 0 if model == "sft" else (cfg.rl.steps if model == "rl" else int(model.split("-")[1]))
        points.append({"model": model, "step": step, "kl": sum(kl) / len(kl) if kl else None,
                       "proxy": sum(proxy) / len(proxy) if proxy else None, "gold": sum(gold) / len(gold), "n": len(mine),
                       **({"kept": model == kept} if kept else {})})
    del reward
    gc.collect()
    return points


@contextmanager
def spending(usage_path: Path, labeler):
    """Use `labeler`, then add what it spent to `usage_path` (an interrupted earlier run's spend too) and close it."""
    try:
        yield labeler
    finally:
        spent = json.loads(usage_path.read_text()) if usage_path.exists() else {}
        now = {k: spent.get(k, 0) + v if isinstance(v, (int, float)) and not isinstance(v, bool) else v
               for k, v in labeler.usage.as_dict().items()}
        atomic_write_json(usage_path, {"labeler": labeler.id, **now})
        labeler.close()
        gc.collect()


# -------------------------------------------------------------------------------------------------
# The stage


def run(cfg: Config) -> Path:
    # 1. Everything checked before anything is written.
    sources = model_sources(cfg)
    constitution = load_constitution(cfg.constitution)
    needs_judge = sum(a in sources and b in sources for a, b in PAIRS) > 0
    if needs_judge and not constitution.comparisons:
        raise CaiError(f"{cfg.constitution}: the constitution has no comparison principles; eval's win rates need at least one")
    templates = Templates(cfg.templates)
    probe = [{"role": "user", "content": "x"}]
    for what in GRADES:
        grade_requests(templates, what, probe, "y")
    templates.render("answer.jinja", prompt="x")
    prompts = eval_prompts(cfg)
    from cai.models import resolve_model

    path = stage_dir(cfg, "eval")
    digest = files_digest([path for path, _ in prompt_files(cfg.eval.prompts)])
    prompts_changed = (path / "prompt_files.sha256").exists() and (path / "prompt_files.sha256").read_text().strip() != digest
    if prompts_changed or not is_current(cfg, "eval"):  # a finished stage samples nothing: no server needed
        sampled = {**sources, **curve_snapshots(cfg, constitution)}  # every model whose answers eval samples
        for name, served in served_names(cfg, sampled).items():
            # its weights here, or the server at policy.base_url serving it under its name: one line otherwise
            check_policy(cfg, sampled[name], served, f"eval.served_models.{name}")
    judge_cfg, training_cfg = labeler_config(cfg, "judge"), labeler_config(cfg, "choices")
    circular = circular_judge(cfg)
    audit_agreement = needs_judge and not circular and cfg.eval.agreement_audit
    for used in (judge_cfg, training_cfg) if audit_agreement else (judge_cfg,):
        if used.backend == "local":
            resolve_model(used.model, cfg.cache_dir)
        if used.backend == "rules":
            from cai.checks import principle_checks
            from cai.labelers.rules import judge_constitution

            judged_by = judge_constitution(cfg, used)  # a judge's own constitution: one line if it lacks a check
            missing = [c.id for c in constitution.comparisons if c.id not in principle_checks(judged_by)]
            if missing:
                raise CaiError(f"{cfg.constitution}: comparison principle '{missing[0]}' has no check; "
                               f"{role_key(cfg, 'judge' if used is judge_cfg else 'choices')}.backend=rules needs one on every comparison principle")
    sl_dir = stage_dir(cfg, "sl")
    examples = pick_examples(sl_dir, cfg.eval.examples) if cfg.eval.examples and is_current(cfg, "sl") else []

    # Prompt files edited since a finished run: resume it, so that only the new prompts are asked.
    if (path / DONE).exists() and prompts_changed:
        print("[eval] the eval.prompts files changed: evaluating their new prompts")
        (path / DONE).unlink()
    stage = open_stage(cfg, "eval", uses_labeler=("judge", "choices") if audit_agreement or cfg.eval.audit_pairs else ("judge",))
    if stage.done:
        return stage.path
    atomic_write_text(stage.path / "prompt_files.sha256", digest + "\n")
    counts = prompt_counts(prompts)
    from_files = sum(n for name, n in counts["sets"].items() if not name.startswith(EVAL_SPLIT))
    no_kind = f", {counts['custom']} of no kind" if counts["custom"] else ""
    print(f"[eval] {len(prompts)} held-out prompts ({counts['red_team']} red-team, {counts['helpful']} helpful{no_kind}; "
          f"{from_files} of them from eval.prompts files); models: {', '.join(sources)}")

    # 2. Answers, lengths, log-probabilities under the model and the reference.
    answers_path = stage.path / "answers.jsonl"
    write_answers(cfg, templates, sources, prompts, answers_path, examples, stage.path / "examples.jsonl")
    answer_rows = {(r["model"], r["id"]): r for r in read_jsonl(answers_path)}
    answers = {key: r["answer"] for key, r in answer_rows.items()}

    # 3. Reward-model scores (and, for an ensemble, its members' disagreement on each model's answers).
    rewards, reward_note, disagreement = None, None, {}
    if is_current(cfg, "rm"):
        from cai.policy_models import PPOReward
        from cai.rewards import RewardModelScorer

        proxy = PPOReward(cfg, RewardModelScorer(stage_dir(cfg, "rm"), cfg.cache_dir))  # the reward as PPO read it
        rewards = {}
        for m in sources:
            scored = proxy.score([p.text for p, _ in prompts], [answers[m, p.id] for p, _ in prompts], [p.kind for p, _ in prompts])
            rewards.update({(m, p.id): s for (p, _), s in zip(prompts, scored.reward.tolist())})
            if scored.disagreement is not None:  # an ensemble: how much its members disagree on this model's answers
                disagreement[m] = float(scored.disagreement.mean())
        del proxy  # the reward model's weights go before the judge's
        gc.collect()
    else:
        reward_note = f"no reward-model scores: {stage_dir(cfg, 'rm')} holds no rm stage finished under this config"
        print(f"[eval] {reward_note}")

    # 3b. The over-optimisation curve over the RL snapshots (rl.keep_snapshots).
    curve = overoptimization_curve(cfg, templates, prompts, constitution, answer_rows, rewards, stage.path / "snapshot_answers.jsonl")

    # 4.-5. The judge (eval.judge, by default the training labeler): pairwise judgements, then
    # harmlessness and refusal grades. With an independent judge, the training labeler judges the same
    # pairs too (the held-out-judge audit).
    judgements_path, grades_path = stage.path / "judgements.jsonl", stage.path / "grades.jsonl"
    training_path = stage.path / "training_labeler_judgements.jsonl"
    pairs_todo = pending_pairs(list(sources), prompts, judgements_path)
    grades_todo = pending_grades(cfg, list(sources), prompts, grades_path)
    usage_path = stage.path / "labeler_usage.json"
    if pairs_todo or grades_todo:
        with spending(usage_path, build_labeler(cfg, role="judge")) as judge:
            judge_comparisons(cfg, judge, judge_cfg, constitution, templates, answers, pairs_todo, judgements_path)
            grade_answers(cfg, judge, judge_cfg, templates, answers, grades_todo, grades_path)
    usage = json.loads(usage_path.read_text()) if usage_path.exists() else {}
    training_todo = pending_pairs(list(sources), prompts, training_path) if audit_agreement else []
    if training_todo:
        print(f"[eval] the training labeler ({role_key(cfg, 'choices')}) judges the same pairs, for the agreement audit")
        with spending(stage.path / "training_labeler_usage.json", build_labeler(cfg, role="choices")) as training:
            judge_comparisons(cfg, training, training_cfg, constitution, templates, answers, training_todo, training_path)

    # 6. The labeler audit: an existing one, or a seeded sample of gold pairs.
    audit_path = Path(cfg.output_dir).expanduser() / "audit" / "labeler_audit.json"
    if cfg.eval.audit_pairs and not audit_path.exists():
        from cai.audit import run_audit

        run_audit(cfg, limit=cfg.eval.audit_pairs)
    audit = None
    if audit_path.exists():
        report = json.loads(audit_path.read_text())
        audit = {k: report.get(k) for k in ("labeler", "gold", "principles", "chain_of_thought", "metrics")}
        audit["path"] = str(audit_path)

    # 7. Metrics and samples.
    ids = {p.id for p, _ in prompts}
    judgements = [j for j in read_jsonl(judgements_path) if j["prompt_id"] in ids]
    grades = [g for g in read_jsonl(grades_path) if g["prompt_id"] in ids and g["model"] in sources]
    agreed = agreement(judgements, [j for j in read_jsonl(training_path) if j["prompt_id"] in ids]) if audit_agreement else None
    roles = {
        "text": {"key": role_key(cfg, "text"), "backend": cfg.labeler.backend, "model": cfg.labeler.model},
        "choices": {"key": role_key(cfg, "choices"), "backend": training_cfg.backend, "model": training_cfg.model},
        "judge": {"key": role_key(cfg, "judge"), "backend": judge_cfg.backend, "model": judge_cfg.model, "id": usage.get("labeler")},
        "circular": circular,
    }
    checked = check_compliance(constitution, prompts, answers, list(sources))
    judge_checked = None
    if judge_cfg.backend == "rules" and judge_cfg.constitution:  # checks no stage trained against, beside the run's
        from cai.checks import refusal_detector
        from cai.labelers.rules import judge_constitution

        judged_by = judge_constitution(cfg, judge_cfg)
        judge_checked = {"constitution": judge_cfg.constitution, "rows": check_compliance(judged_by, prompts, answers, list(sources)),
                         "refusal": refusal_detector(judged_by)}
    metrics, samples = aggregate(cfg, sources, prompts, answer_rows, judgements, grades, rewards, reward_note, audit, usage,
                                 roles=roles, checked=checked, agreement=agreed, judge_checked=judge_checked)
    metrics["overoptimization"] = curve
    # 7b. Prompts written by `cai redteam` (rows with a principle and a style): attack success per principle and style.
    from cai.redteam import attack_success

    metrics["red_team_attacks"] = attack_success(constitution, prompts, answers, grades, list(sources),
                                                 dict(resamples=cfg.eval.bootstrap, level=cfg.eval.confidence, seed=cfg.seed))
    if disagreement:
        metrics["reward_disagreement"] = disagreement
    atomic_write_json(stage.path / "metrics.json", metrics)
    atomic_write_text(stage.path / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))

    # 8. The report.
    from cai.report import headlines, write_report

    html, md = write_report(Path(cfg.output_dir).expanduser())
    for line in headlines(metrics):
        print(f"[eval] {line}")
    return stage.finish(f"{len(prompts)} prompts, {len(judgements)} pairs judged, report {html}")
