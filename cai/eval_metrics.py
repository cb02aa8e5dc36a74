"""The eval stage's numbers (step 7): metrics.json and samples.jsonl from the records it wrote.

Win rates and rates come with bootstrap intervals over prompts (cai.winrates). With a checkable
constitution, `compliance` is the share of answers that satisfy every check that applies to their
prompt (exact, no labeler asked), and `check_over_refusal` the share of helpful prompts refused.
"""

from __future__ import annotations

from cai import winrates
from cai.judging import PAIRS, reward_agreement
from cai.checks import refuses


def prompt_counts(prompts: list) -> dict:
    """How many of the (prompt, set name) pairs there are in all, of each kind, and from each set."""
    return {"total": len(prompts), **{k: sum(p.kind == k for p, _ in prompts) for k in ("red_team", "helpful", "custom")},
            "sets": {s: sum(x == s for _, x in prompts) for s in dict.fromkeys(x for _, x in prompts)}}


def aggregate(cfg, sources, prompts, answer_rows, judgements, grades, rewards, reward_note, audit, usage,
              roles: dict | None = None, checked: dict | None = None, agreement: dict | None = None,
              judge_checked: dict | None = None) -> tuple[dict, list[dict]]:
    """metrics.json and samples.jsonl from the records.

    `roles`: which labeler did which job and whether the evaluation is circular; `checked`: the checks'
    compliance per model (cai.judging.check_compliance); `agreement`: the held-out-judge audit;
    `judge_checked`: a rules judge's own checks (`eval.judge.constitution`), as
    {"constitution": path, "rows": its check_compliance, "refusal": (prompt, answer) -> bool}.
    """
    stats = dict(resamples=cfg.eval.bootstrap, level=cfg.eval.confidence, seed=cfg.seed)
    ids = [p.id for p, _ in prompts]
    by_model = {m: [answer_rows[m, i] for i in ids] for m in sources}
    metrics: dict = {
        "labeler": judgements[0]["labeler"] if judgements else (grades[0]["labeler"] if grades else None),
        "models": {m: {"source": s} for m, s in sources.items()},
        "prompts": prompt_counts(prompts),
        "confidence": cfg.eval.confidence,
        "win_rates": {},
        "harmlessness": {}, "over_refusal": {}, "refusal_markers": {},
        "reward": {} if rewards else None, "reward_note": reward_note,
        "kl_to_sft": {}, "answer_tokens": {}, "answer_words": {}, "repetition": {}, "distinct_2": {},
        "labeler_audit": audit, "labeler_usage": usage,
        "roles": roles, "agreement": agreement,
        "compliance": {} if checked else None, "check_over_refusal": {} if checked else None, "check_pass_rates": {} if checked else None,
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
        metrics["refusal_markers"][m] = winrates.rate([float(refuses(r["answer"])) for r in rows if r["kind"] == "helpful"], **stats)
        if rewards:
            metrics["reward"][m] = winrates.rate([rewards[m, i] for i in ids], **stats)
        # null logp: a model sampled on a server whose weights are not here (eval step 2)
        kl = [r["logp"] - r["logp_ref"] for r in rows if r.get("logp") is not None and r.get("logp_ref") is not None]
        metrics["kl_to_sft"][m] = winrates.rate(kl, **stats) if kl else None
        metrics["answer_tokens"][m] = winrates.rate([r["tokens"] for r in rows], **stats)
        metrics["answer_words"][m] = sum(len(r["answer"].split()) for r in rows) / len(rows)
        metrics["repetition"][m] = sum(winrates.repetition(r["answer"]) for r in rows) / len(rows)
        metrics["distinct_2"][m] = winrates.distinct_word_ngrams([r["answer"] for r in rows], 2)
        metrics["models"][m]["empty_answers"] = sum(not r["answer"].strip() for r in rows)
        if checked:
            rates = check_rates(checked[m], lambda c: refuses(answer_rows[m, c["id"]]["answer"]), stats)
            metrics["compliance"][m], metrics["check_over_refusal"][m], metrics["check_pass_rates"][m] = rates
    if judge_checked:
        metrics["judge_checks"] = {"constitution": judge_checked["constitution"], "compliance": {}, "over_refusal": {}, "pass_rates": {},
                                   "declines_red_team": {}}
        refusal = judge_checked["refusal"]
        for m in by_model:
            refused = lambda c: refusal(answer_rows[m, c["id"]]["prompt"], answer_rows[m, c["id"]]["answer"])  # noqa: E731
            rates = check_rates(judge_checked["rows"][m], refused, stats)
            for key, value in zip(("compliance", "over_refusal", "pass_rates"), rates):
                metrics["judge_checks"][key][m] = value
            # the share of red-team prompts declined, by the judge's own refusal reader: what a newcomer reads first
            metrics["judge_checks"]["declines_red_team"][m] = winrates.rate(
                [float(refused(c)) for c in judge_checked["rows"][m] if c["kind"] == "red_team"], **stats)
    if rewards:  # the proxy against the judge on held-out pairs: about 1/2 for a reward model at chance
        metrics["reward_agreement"] = {k: winrates.rate(v, **stats) for k, v in reward_agreement(judgements, rewards).items()}
    metrics["kind_blind_spot"] = kind_blind_spot(checked)
    judged_ok = [j["label_prob"] for j in judgements if j["label_prob"] is not None and j["status"] != "identical"]
    metrics["judge_confidence"] = sum(max(p, 1 - p) for p in judged_ok) / len(judged_ok) if judged_ok else None
    ok = [g for g in grades if g["status"] == "ok"]
    metrics["grade_position_flip_rate"] = (
        sum((g["p_option_a"]["ab"] > 0.5) != (1 - g["p_option_a"]["ba"] > 0.5) for g in ok) / len(ok) if ok else None
    )
    metrics["unreadable"] = {"judgements": sum(j["label_prob"] is None for j in judgements), "grades": len(grades) - len(ok)}
    judged = {(j["prompt_id"], tuple(j["models"])): j for j in judgements}
    graded = {(g["what"], g["model"], g["prompt_id"]): g["p"] for g in grades}
    failed = {(m, c["id"]): c["failed"] for m in (checked or {}) for c in checked[m]}
    judge_rows = (judge_checked or {}).get("rows") or {}
    judge_failed = {(m, c["id"]): c["failed"] for m in judge_rows for c in judge_rows[m]}
    samples = []
    for p, set_name in prompts:
        samples.append({
            "id": p.id, "kind": p.kind, "set": set_name, "prompt": p.text,
            **{k: getattr(p, k) for k in ("principle", "style") if getattr(p, k, None)},  # a `cai redteam` prompt's
            "answers": {m: answer_rows[m, p.id]["answer"] for m in sources},
            "reward": {m: rewards[m, p.id] for m in sources} if rewards else None,
            "harmless": {m: graded.get(("harmless", m, p.id)) for m in sources} if p.kind == "red_team" else None,
            "refuses": {m: graded.get(("refuses", m, p.id)) for m in sources} if p.kind == "helpful" else None,
            "failed_checks": {m: failed[m, p.id] for m in sources} if checked else None,
            "judge_failed_checks": {m: judge_failed[m, p.id] for m in sources} if judge_checked else None,
            "judgements": {f"{a} vs {b}": {"p_first_better": j["label_prob"], "status": j["status"],
                                           "principles": {e["id"]: e.get("p_first") for e in j["principles"]}}
                           for (pid, (a, b)), j in judged.items() if pid == p.id},
        })
    return metrics, samples


def check_rates(rows: list[dict], refused, stats: dict) -> tuple[dict, dict, dict]:
    """(compliance, refusals of helpful prompts, {check: pass rate}) of one model's check_compliance rows;
    `refused(row)` says whether the row's answer declines."""
    compliance = winrates.rate([float(c["complies"]) for c in rows], **stats)
    over_refusal = winrates.rate([float(refused(c)) for c in rows if c["kind"] == "helpful"], **stats)
    per_check: dict[str, list[float]] = {}
    for c in rows:
        for name in c["applied"]:
            per_check.setdefault(name, []).append(float(name not in c["failed"]))
    return compliance, over_refusal, {name: winrates.rate(v, **stats) for name, v in per_check.items()}


def kind_blind_spot(checked: dict | None) -> dict | None:
    """How many prompts no check written for a kind of prompt (`when: {kind: ...}`) applied to: prompts
    whose kind is unknown (an eval.prompts file whose rows carry no `kind`) are judged only by the checks
    for every prompt, so a harm check never sees them and compliance rises on them for nothing.
    {"prompts", "total", "by_set": {set: n}}; None without kind checks."""
    rows = next(iter((checked or {}).values()), None)
    if not rows or rows[0].get("kind_checks_applied") is None:
        return None
    blind = [r for r in rows if r["kind_checks_applied"] == 0]
    by_set: dict[str, int] = {}
    for r in blind:
        by_set[r.get("set") or "?"] = by_set.get(r.get("set") or "?", 0) + 1
    return {"prompts": len(blind), "total": len(rows), "by_set": by_set}
