"""Stage 6, evaluation: did the constitution work? AI judges compare the models on prompts no stage saw.

1. Check everything first: the stages whose models are compared (`eval.models`: initial = policy.model,
   sft = the SL-CAI model, rl = the RL policy) are done; the prompt files named in `eval.prompts` hold
   a `prompt` field; the templates render. The eval split of the prompts (red-team and helpful) was
   held out of every earlier stage.
2. Each model answers every prompt (`eval.temperature`); one record per answer is appended to
   `eval/answers.jsonl` per batch, with its length and its log-probability under the model and under
   the SL-CAI model (the RL stage's reference), so KL(model || reference) needs no second pass. The
   final policy also answers the prompts of a few SL-CAI records, for the report's example table.
3. Reward-model scores of every answer (skipped, and said so, when `rm/` is missing).
4. Pairwise comparisons (rl vs initial, rl vs sft, sft vs initial) judged by the labeler with the prefs
   stage's machinery (`cai.preferences.judge_pairs`: each principle in both orders, un-flipped,
   averaged) — by default every comparison principle on every prompt, so each principle gets a win
   rate. One record per pair goes to `eval/judgements.jsonl` per batch.
5. Harmlessness of the red-team answers and refusals of the helpful ones, asked of the labeler as
   (A)/(B) questions in both orders (`prompts/harmlessness.jinja`, `prompts/refusal.jinja`) and
   un-flipped the same way -> `eval/grades.jsonl`.
6. The labeler audit: an existing one (`cai audit-labeler`), or a seeded sample of `eval.audit_pairs`.
7. Aggregate (`cai.winrates`: win rates with bootstrap intervals over prompts) -> `eval/metrics.json`,
   `eval/samples.jsonl` (each prompt with every model's answer and the judgements).
8. The report (`cai.report`): `eval/report.html` (self-contained) and `eval/report.md`.

A killed run resumes: answers, judgements and grades already on disk are not asked for again, and
the labeler's answer cache covers the batch that was in flight.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path

from cai import winrates
from cai.chat import conversation, policy_input
from cai.config import Config
from cai.constitution import load_constitution
from cai.errors import CaiError
from cai.labelers import ChoiceRequest, GenerateRequest, build_labeler
from cai.labelers.local import LocalGenerator
from cai.labelers.parsing import is_refusal
from cai.preferences import ANSWER_PREFIX, OPTIONS, JudgeSettings, PairItem, draw_comparisons, first_answer_prob, judge_pairs
from cai.promptsets import Prompt, load_prompt_file, prompt_files, split_prompts, training_overlap
from cai.records import DONE, JsonlWriter, atomic_write_json, atomic_write_text, read_jsonl
from cai.stages import is_current, open_stage, require_done, stage_dir
from cai.templates import Templates

# The comparisons, newest model first: the label is P(newer model's answer is better).
PAIRS = (("rl", "initial"), ("rl", "sft"), ("sft", "initial"))
GRADES = {"harmless": ("harmlessness.jinja", "red_team"), "refuses": ("refusal.jinja", "helpful")}
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
                  f"(sl/prefs/rl), so they are not held out; e.g. {shared[0].text[:60]!r}")
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
    return LocalGenerator(model, tokenizer, cfg.policy.batch_size, cfg.seed, cfg.policy.system_prompt)


def pick_examples(sl_dir: Path, n: int) -> list[dict]:
    """The first `n` red-team SL-CAI records (by id, revised ones first): the report's example table."""
    records = [r for r in read_jsonl(sl_dir / "records.jsonl") if r["kind"] == "red_team" and r["rounds"]]
    records.sort(key=lambda r: (not r.get("revised"), r["id"]))
    return records[:n]


def write_answers(cfg, templates, sources, prompts, path: Path, examples: list[dict], examples_path: Path) -> None:
    """Every model answers every prompt not yet answered (step 2); the last model answers the examples."""
    done = {(r["model"], r["id"]) for r in read_jsonl(path, repair=True)}
    sft_dir = stage_dir(cfg, "sft")
    reference_source = str(sft_dir) if is_current(cfg, "sft") else None
    final = next(m for m in ("rl", "sft", "initial") if m in sources)  # the newest model shows the examples
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
    with JsonlWriter(path) as writer:
        for model_name, source in sources.items():
            if not todo[model_name] and not (model_name == final and need_examples):
                continue
            generator = reference if (model_name == "sft" and reference is not None) else load_generator(source, cfg)
            rows = todo[model_name]
            for start in range(0, len(rows), cfg.policy.batch_size):
                batch = rows[start : start + cfg.policy.batch_size]
                print(f"[eval] {model_name} answers prompts {len(prompts) - len(rows) + start + 1}-"
                      f"{len(prompts) - len(rows) + start + len(batch)} of {len(prompts)}")
                messages = [ask(p.text) for p, _ in batch]
                generations = generator.generate([GenerateRequest(m, **sampling) for m in messages])
                answers = [g.text or "" for g in generations]
                logp = answer_logprobs(generator, messages, answers, temperature)
                if reference is None:
                    logp_ref = [None] * len(batch)
                else:
                    logp_ref = logp if generator is reference else answer_logprobs(reference, messages, answers, temperature)
                for (p, set_name), g, a, lp, lr in zip(batch, generations, answers, logp, logp_ref):
                    writer.write({
                        "model": model_name, "id": p.id, "kind": p.kind, "set": set_name, "prompt": p.text,
                        "answer": a, "status": g.status, "tokens": len(generator.tokenizer(a, add_special_tokens=False)["input_ids"]),
                        "logp": lp, "logp_ref": lr,
                    })
            if model_name == final and need_examples:
                print(f"[eval] {model_name} answers the prompts of {len(examples)} SL-CAI examples")
                generations = generator.generate([GenerateRequest(ask(r["prompt"]), **sampling) for r in examples])
                rows_out = [{
                    "id": r["id"], "prompt": r["prompt"], "first_answer": r["initial"],
                    "rounds": [{k: x.get(k) for k in ("principle_id", "critique", "revision")} for x in r["rounds"]],
                    "sl_final": r["final"], "policy": model_name, "policy_answer": g.text or "",
                } for r, g in zip(examples, generations)]
                atomic_write_text(examples_path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows_out))
            if generator is not reference:
                del generator
                gc.collect()


# -------------------------------------------------------------------------------------------------
# 4.-5. The labeler's judgements


def pending_pairs(models: list[str], prompts, path: Path) -> list[tuple]:
    """(prompt, set, newer model, older model) of every pair not judged yet."""
    done = {r["id"] for r in read_jsonl(path, repair=True)}
    pairs = [(a, b) for a, b in PAIRS if a in models and b in models]
    return [(p, s, a, b) for a, b in pairs for p, s in prompts if f"{p.id}:{a}>{b}" not in done]


def judge_comparisons(cfg, labeler, constitution, templates, answers: dict, todo: list[tuple], path: Path) -> None:
    """Every pair of models on every prompt, judged in both orders under the comparison principles."""
    comparisons = constitution.comparisons
    m = cfg.eval.principles_per_pair or len(comparisons)
    settings = JudgeSettings.from_config(cfg, principles_per_pair=m)
    per_call = max(1, cfg.labeler.batch_size)
    with JsonlWriter(path) as writer:
        for start in range(0, len(todo), per_call):
            batch = todo[start : start + per_call]
            print(f"[eval] judging pairs {start + 1}-{start + len(batch)} of the {len(todo)} left")
            items = [PairItem(f"{p.id}:{a}>{b}", conversation(p.text, None, cfg.policy.system_prompt), answers[a, p.id], answers[b, p.id])
                     for p, _, a, b in batch]
            asked = [item for item in items if item.first.strip() != item.second.strip()]
            verdicts = {v.item_id: v for v in (judge_pairs(labeler, asked, constitution, templates, settings=settings, desc="judging") if asked else [])}
            for (p, set_name, a, b), item in zip(batch, items):
                verdict = verdicts.get(item.id)
                if verdict is None:  # the same answer twice: a tie under every principle, nothing asked
                    tie = {"p_option_a": None, "p_first": 0.5, "status": "identical"}
                    principles = [{"id": c.id, "question": c.question, "orders": {"ab": tie, "ba": tie}, "p_first": 0.5, "status": "ok"}
                                  for c in draw_comparisons(comparisons, cfg.seed, item.id, m)]
                    record = {"label_prob": 0.5, "status": "identical", "principles": principles}
                else:
                    record = verdict.as_dict()
                writer.write({"id": item.id, "prompt_id": p.id, "kind": p.kind, "set": set_name, "models": [a, b], **record,
                              "labeler": labeler.id})


def grade_requests(templates, what: str, conv: list[dict], answer: str) -> list[ChoiceRequest]:
    """The two orders of one (A)/(B) grading question; option (A) is 'harmless'/'helps' when not flipped."""
    template = GRADES[what][0]
    return [ChoiceRequest([{"role": "user", "content": templates.render(template, conversation=conv, response=answer, flipped=flipped)}],
                          options=OPTIONS, answer_prefix=ANSWER_PREFIX) for flipped in (False, True)]


def read_grade(choices) -> dict:
    """P(first-listed option) from both orders, un-flipped and averaged, or None when unreadable."""
    p_a = {}
    for order, choice in zip(("ab", "ba"), choices):
        probs = choice.probs if choice is not None and choice.status == "ok" else None
        p_a[order] = probs[0] / (probs[0] + probs[1]) if probs and len(probs) == 2 and sum(probs) > 0 else None
    if None in p_a.values():
        return {"p": None, "status": "unreadable", "p_option_a": p_a}
    p = (first_answer_prob(p_a["ab"], "ab") + first_answer_prob(p_a["ba"], "ba")) / 2
    return {"p": p, "status": "ok", "p_option_a": p_a}


def pending_grades(cfg, models: list[str], prompts, path: Path) -> list[tuple]:
    """(what, model, prompt) of every grade not asked yet: harmless for red-team, refuses for helpful."""
    wanted = [w for w, on in (("harmless", cfg.eval.harmlessness), ("refuses", cfg.eval.refusal)) if on]
    done = {r["id"] for r in read_jsonl(path, repair=True)}
    return [(w, m, p) for w in wanted for m in models for p, _ in prompts if p.kind == GRADES[w][1] and f"{w}:{m}:{p.id}" not in done]


def grade_answers(cfg, labeler, templates, answers: dict, todo: list[tuple], path: Path) -> None:
    """P(harmless) of red-team answers, P(refuses) of helpful ones (step 5)."""
    per_call = max(1, cfg.labeler.batch_size)
    with JsonlWriter(path) as writer:
        for start in range(0, len(todo), per_call):
            batch = todo[start : start + per_call]
            print(f"[eval] grading answers {start + 1}-{start + len(batch)} of the {len(todo)} left")
            requests = [r for w, m, p in batch for r in grade_requests(templates, w, conversation(p.text, None, cfg.policy.system_prompt), answers[m, p.id])]
            choices = labeler.choose(requests, desc="grading")
            for k, (w, m, p) in enumerate(batch):
                grade = read_grade(choices[2 * k : 2 * k + 2])
                if w == "refuses" and grade["p"] is not None:
                    grade["p"] = 1.0 - grade["p"]  # the first-listed option is "helps"
                writer.write({"id": f"{w}:{m}:{p.id}", "what": w, "model": m, "prompt_id": p.id, **grade, "labeler": labeler.id})


# -------------------------------------------------------------------------------------------------
# 7. Aggregation


def aggregate(cfg, sources, prompts, answer_rows, judgements, grades, rewards, reward_note, audit, usage) -> tuple[dict, list[dict]]:
    """metrics.json and samples.jsonl from the records."""
    stats = dict(resamples=cfg.eval.bootstrap, level=cfg.eval.confidence, seed=cfg.seed)
    ids = [p.id for p, _ in prompts]
    by_model = {m: [answer_rows[m, i] for i in ids] for m in sources}
    metrics: dict = {
        "labeler": judgements[0]["labeler"] if judgements else (grades[0]["labeler"] if grades else None),
        "models": {m: {"source": s} for m, s in sources.items()},
        "prompts": {"total": len(prompts), **{k: sum(p.kind == k for p, _ in prompts) for k in ("red_team", "helpful", "custom")},
                    "sets": {s: sum(x == s for _, x in prompts) for s in dict.fromkeys(x for _, x in prompts)}},
        "confidence": cfg.eval.confidence,
        "win_rates": {},
        "harmlessness": {}, "over_refusal": {}, "refusal_markers": {},
        "reward": {} if rewards else None, "reward_note": reward_note,
        "kl_to_sft": {}, "answer_tokens": {}, "answer_words": {}, "repetition": {}, "distinct_2": {},
        "labeler_audit": audit, "labeler_usage": usage,
    }
    for a, b in PAIRS:
        if a in sources and b in sources:
            metrics["win_rates"][f"{a} vs {b}"] = winrates.win_rates(judgements, a, b, **stats)
    for m, rows in by_model.items():
        pick = lambda what: [g["p"] for g in grades if g["model"] == m and g["what"] == what]  # noqa: E731
        if cfg.eval.harmlessness:
            metrics["harmlessness"][m] = winrates.rate(pick("harmless"), **stats)
        if cfg.eval.refusal:
            metrics["over_refusal"][m] = winrates.rate(pick("refuses"), **stats)
        metrics["refusal_markers"][m] = winrates.rate([float(is_refusal(r["answer"])) for r in rows if r["kind"] == "helpful"], **stats)
        if rewards:
            metrics["reward"][m] = winrates.rate([rewards[m, i] for i in ids], **stats)
        kl = [r["logp"] - r["logp_ref"] for r in rows if r.get("logp_ref") is not None]
        metrics["kl_to_sft"][m] = winrates.rate(kl, **stats) if kl else None
        metrics["answer_tokens"][m] = winrates.rate([r["tokens"] for r in rows], **stats)
        metrics["answer_words"][m] = sum(len(r["answer"].split()) for r in rows) / len(rows)
        metrics["repetition"][m] = sum(winrates.repetition(r["answer"]) for r in rows) / len(rows)
        metrics["distinct_2"][m] = winrates.distinct_word_ngrams([r["answer"] for r in rows], 2)
        metrics["models"][m]["empty_answers"] = sum(not r["answer"].strip() for r in rows)
    judged_ok = [j["label_prob"] for j in judgements if j["label_prob"] is not None and j["status"] != "identical"]
    metrics["judge_confidence"] = sum(max(p, 1 - p) for p in judged_ok) / len(judged_ok) if judged_ok else None
    ok = [g for g in grades if g["status"] == "ok"]
    metrics["grade_position_flip_rate"] = (
        sum((g["p_option_a"]["ab"] > 0.5) != (1 - g["p_option_a"]["ba"] > 0.5) for g in ok) / len(ok) if ok else None
    )
    metrics["unreadable"] = {"judgements": sum(j["label_prob"] is None for j in judgements), "grades": len(grades) - len(ok)}
    judged = {(j["prompt_id"], tuple(j["models"])): j for j in judgements}
    graded = {(g["what"], g["model"], g["prompt_id"]): g["p"] for g in grades}
    samples = []
    for p, set_name in prompts:
        samples.append({
            "id": p.id, "kind": p.kind, "set": set_name, "prompt": p.text,
            "answers": {m: answer_rows[m, p.id]["answer"] for m in sources},
            "reward": {m: rewards[m, p.id] for m in sources} if rewards else None,
            "harmless": {m: graded.get(("harmless", m, p.id)) for m in sources} if p.kind == "red_team" else None,
            "refuses": {m: graded.get(("refuses", m, p.id)) for m in sources} if p.kind == "helpful" else None,
            "judgements": {f"{a} vs {b}": {"p_first_better": j["label_prob"], "status": j["status"],
                                           "principles": {e["id"]: e.get("p_first") for e in j["principles"]}}
                           for (pid, (a, b)), j in judged.items() if pid == p.id},
        })
    return metrics, samples


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

    for source in sources.values():
        resolve_model(source, cfg.cache_dir)
    if cfg.labeler.backend == "local":
        resolve_model(cfg.labeler.model, cfg.cache_dir)
    sl_dir = stage_dir(cfg, "sl")
    examples = pick_examples(sl_dir, cfg.eval.examples) if cfg.eval.examples and is_current(cfg, "sl") else []

    # Prompt files edited since a finished run: resume it, so that only the new prompts are asked.
    path = stage_dir(cfg, "eval")
    digest = files_digest([path for path, _ in prompt_files(cfg.eval.prompts)])
    if (path / DONE).exists() and (path / "prompt_files.sha256").exists() and (path / "prompt_files.sha256").read_text().strip() != digest:
        print("[eval] the eval.prompts files changed: evaluating their new prompts")
        (path / DONE).unlink()
    stage = open_stage(cfg, "eval", uses_labeler=True)
    if stage.done:
        return stage.path
    atomic_write_text(stage.path / "prompt_files.sha256", digest + "\n")
    counts = {k: sum(p.kind == k for p, _ in prompts) for k in ("red_team", "helpful", "custom")}
    print(f"[eval] {len(prompts)} held-out prompts ({counts['red_team']} red-team, {counts['helpful']} helpful, "
          f"{counts['custom']} from files); models: {', '.join(sources)}")

    # 2. Answers, lengths, log-probabilities under the model and the reference.
    answers_path = stage.path / "answers.jsonl"
    write_answers(cfg, templates, sources, prompts, answers_path, examples, stage.path / "examples.jsonl")
    answer_rows = {(r["model"], r["id"]): r for r in read_jsonl(answers_path)}
    answers = {key: r["answer"] for key, r in answer_rows.items()}

    # 3. Reward-model scores.
    rewards, reward_note = None, None
    if is_current(cfg, "rm"):
        from cai.rewards import RewardModelScorer

        scorer = RewardModelScorer(stage_dir(cfg, "rm"), cfg.cache_dir)
        rewards = {}
        for m in sources:
            scores = scorer([p.text for p, _ in prompts], [answers[m, p.id] for p, _ in prompts])
            rewards.update({(m, p.id): s for (p, _), s in zip(prompts, scores)})
        del scorer
        gc.collect()
    else:
        reward_note = f"no reward-model scores: {stage_dir(cfg, 'rm')} holds no rm stage finished under this config"
        print(f"[eval] {reward_note}")

    # 4.-5. The labeler: pairwise judgements, then harmlessness and refusal grades.
    judgements_path, grades_path = stage.path / "judgements.jsonl", stage.path / "grades.jsonl"
    pairs_todo = pending_pairs(list(sources), prompts, judgements_path)
    grades_todo = pending_grades(cfg, list(sources), prompts, grades_path)
    usage_path = stage.path / "labeler_usage.json"
    if pairs_todo or grades_todo:
        labeler = build_labeler(cfg)
        try:
            judge_comparisons(cfg, labeler, constitution, templates, answers, pairs_todo, judgements_path)
            grade_answers(cfg, labeler, templates, answers, grades_todo, grades_path)
        finally:  # added to what an interrupted earlier run of this stage spent
            spent = json.loads(usage_path.read_text()) if usage_path.exists() else {}
            now = {k: spent.get(k, 0) + v if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                   for k, v in labeler.usage.as_dict().items()}
            atomic_write_json(usage_path, {"labeler": labeler.id, **now})
            labeler.close()
            del labeler
            gc.collect()
    usage = json.loads(usage_path.read_text()) if usage_path.exists() else {}

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
    metrics, samples = aggregate(cfg, sources, prompts, answer_rows, judgements, grades, rewards, reward_note, audit, usage)
    atomic_write_json(stage.path / "metrics.json", metrics)
    atomic_write_text(stage.path / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))

    # 8. The report.
    from cai.report import headlines, write_report

    html, md = write_report(Path(cfg.output_dir).expanduser())
    for line in headlines(metrics):
        print(f"[eval] {line}")
    return stage.finish(f"{len(prompts)} prompts, {len(judgements)} pairs judged, report {html}")
