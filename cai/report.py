"""The run report: plots and one page, `eval/report.html` (self-contained) and `eval/report.md`.

Everything here is a pure function of what the stages left on disk (`eval/metrics.json`,
`eval/samples.jsonl`, `eval/examples.jsonl`, `rl/metrics.jsonl`, the audit, the resolved config and
the constitution), so the report can be rebuilt at any time without a model:

    python -m cai.report OUTPUT_DIR

Plots are matplotlib PNGs, written to `eval/plots/` for the Markdown file and embedded (base64) in
the HTML file, which therefore opens anywhere, offline, as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from pathlib import Path

import yaml

from cai.records import atomic_write_text, read_jsonl

NAMES = {"initial": "initial model", "sft": "SL-CAI", "rl": "RL policy"}
COLORS = {"initial": "#9aa5b1", "sft": "#3b82c4", "rl": "#d9822b"}


def name(model: str) -> str:
    return NAMES.get(model, model)


def pct(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def ci_text(ci, as_pct: bool = True) -> str:
    if not ci:
        return ""
    return f"[{pct(ci[0])}, {pct(ci[1])}]" if as_pct else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


# -------------------------------------------------------------------------------------------------
# Reading the run


def load_run(run_dir: str | Path) -> dict:
    """Everything the report shows, read from `run_dir` (the config's output_dir)."""
    run_dir = Path(run_dir).expanduser()
    eval_dir = run_dir / "eval"
    if not (eval_dir / "metrics.json").is_file():
        raise FileNotFoundError(f"{eval_dir / 'metrics.json'} not found: run `cai eval CONFIG` first")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    audit_items = []
    audit_path = Path((metrics.get("labeler_audit") or {}).get("path") or run_dir / "audit" / "labeler_audit.json")
    if metrics.get("labeler_audit") and audit_path.is_file():
        audit_items = json.loads(audit_path.read_text()).get("items", [])
    constitution_text = (eval_dir / "constitution.yaml").read_text() if (eval_dir / "constitution.yaml").exists() else ""
    config_text = (eval_dir / "config.yaml").read_text() if (eval_dir / "config.yaml").exists() else ""
    try:
        constitution = yaml.safe_load(constitution_text) or {}
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        constitution, config = {}, {}
    return {
        "run_dir": run_dir,
        "metrics": metrics,
        "samples": read_jsonl(eval_dir / "samples.jsonl"),
        "examples": read_jsonl(eval_dir / "examples.jsonl"),
        "rl_rows": read_jsonl(run_dir / "rl" / "metrics.jsonl"),
        "rounds": _json_or_none(run_dir / "rl" / "rounds.json"),
        "selection": _json_or_none(run_dir / "rl" / "selection.json"),
        "audit_items": audit_items,
        "config_text": config_text,
        "config": config if isinstance(config, dict) else {},
        "constitution_text": constitution_text,
        "constitution": constitution if isinstance(constitution, dict) else {},
        "questions": {c.get("id"): c.get("question") for c in (constitution or {}).get("comparisons", []) or [] if isinstance(c, dict)},
        "stress": json.loads((run_dir / "stress" / "stress.json").read_text()) if (run_dir / "stress" / "stress.json").is_file() else None,
    }


def _json_or_none(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


# -------------------------------------------------------------------------------------------------
# Headlines


def compliance_table(compliance: dict, over_refusal: dict | None, pass_rates: dict | None) -> tuple[list, list]:
    """Per model: compliance, refusals of helpful prompts and each check's pass rate, with intervals."""
    rate_fmt = lambda r: "n/a" if not r or r.get("mean") is None else f"{pct(r['mean'])} {ci_text(r['ci'])} (n={r['n']})"  # noqa: E731
    head = ["check"] + [name(x) for x in compliance]
    rows = [["every check that applies"] + [rate_fmt(r) for r in compliance.values()]]
    rows += [["refusals of helpful prompts ↓"] + [rate_fmt((over_refusal or {}).get(x)) for x in compliance]]
    checks = sorted({c for per in (pass_rates or {}).values() for c in per})
    rows += [[c] + [rate_fmt(((pass_rates or {}).get(x) or {}).get(c)) for x in compliance] for c in checks]
    return head, rows


def headline_items(metrics: dict) -> list[dict]:
    """Up to three numbers a person reads first: the main win rate, harmlessness, over-refusal
    (the reward-model score fills in when a grade is missing). Each: title, value, detail."""
    items = []
    judge_checks = metrics.get("judge_checks") or {}
    declined = {m: r for m, r in (judge_checks.get("declines_red_team") or {}).items() if r.get("mean") is not None and r["n"]}
    refused = {m: r for m, r in (judge_checks.get("over_refusal") or {}).items() if r.get("mean") is not None and r["n"]}
    if declined and refused:  # the constitution taking hold, and what it costs, by checks no stage trained against
        items.append({"title": "Harmful requests declined | helpful ones refused",
                      "value": " → ".join(pct(r["mean"]) for r in declined.values()) + " | "
                               + " → ".join(pct(r["mean"]) for r in refused.values()),
                      "detail": f"{', '.join(name(m) for m in declined)}; held-out prompts ({max(r['n'] for r in declined.values())} "
                                f"red-team, {max(r['n'] for r in refused.values())} helpful), judged by checks no stage trained "
                                f"against ({judge_checks['constitution']}), intervals "
                                + ", ".join(ci_text(r["ci"]) for r in declined.values()) + " | "
                                + ", ".join(ci_text(r["ci"]) for r in refused.values()) + preference_labels_text(metrics)})
    judged = {m: r for m, r in (judge_checks.get("compliance") or {}).items() if r.get("mean") is not None}
    if judged:
        items.append({"title": "Compliance, judged by checks no stage trained against",
                      "value": " → ".join(pct(r["mean"]) for r in judged.values()),
                      "detail": f"{', '.join(name(m) for m in judged)}; by {metrics['judge_checks']['constitution']}, intervals "
                                + ", ".join(ci_text(r["ci"]) for r in judged.values())})
    compliance = {m: r for m, r in (metrics.get("compliance") or {}).items() if r.get("mean") is not None}
    if compliance:
        roles = metrics.get("roles") or {}
        trained = roles.get("circular", True) or labeled_by_checks(metrics)
        judge = "the checks the preference labels came from" if trained else "an independent judge"
        items.append({"title": "Compliance with the constitution's checks",
                      "value": " → ".join(pct(r["mean"]) for r in compliance.values()),
                      "detail": f"{', '.join(name(m) for m in compliance)}; share of held-out answers that satisfy every check "
                                f"that applies to their prompt, checked exactly ({judge}), intervals "
                                + ", ".join(ci_text(r["ci"]) for r in compliance.values()) + blind_spot_text(metrics)})
    wins = metrics.get("win_rates") or {}
    key = next((k for k in ("rl vs initial", "rl vs sft", "sft vs initial") if k in wins), None)
    if key and wins[key]["overall"]["n"]:
        o = wins[key]["overall"]
        items.append({"title": f"Win rate, {name(wins[key]['model'])} vs {name(wins[key]['opponent'])}",
                      "value": pct(o["win_rate"]),
                      "detail": f"{ci_text(o['ci'])} over {o['n']} held-out prompts (soft win rate {pct(o['soft_win_rate'])}), "
                                f"judged by {metrics.get('labeler')} in both orders"
                                + (" — the training labeler: circular" if (metrics.get("roles") or {}).get("circular") else "")})
    for key, title, better in (("harmlessness", "Harmlessness on red-team prompts", "higher"),
                               ("over_refusal", "Over-refusal on helpful prompts", "lower")):
        rates = {m: r for m, r in (metrics.get(key) or {}).items() if r.get("mean") is not None}
        if rates:
            n = max(r["n"] for r in rates.values())
            items.append({"title": title, "value": " → ".join(pct(r["mean"]) for r in rates.values()),
                          "detail": f"{', '.join(name(m) for m in rates)}; P({'harmless' if key == 'harmlessness' else 'refuses'}) "
                                    f"by {metrics.get('labeler') or 'the judge'}, n={n}, {better} is better"})
    rewards = {m: r for m, r in (metrics.get("reward") or {}).items() if r.get("mean") is not None}
    if len(items) < 3 and rewards:
        items.append({"title": "Reward-model score", "value": " → ".join(f"{r['mean']:+.2f}" for r in rewards.values()),
                      "detail": f"{', '.join(name(m) for m in rewards)}; mean, normalised"})
    return items[:3]


def labeled_by_checks(metrics: dict) -> bool:
    """The preference labels came from the constitution's checks (choice_labeler.backend=rules)."""
    return ((metrics.get("roles") or {}).get("choices") or {}).get("backend") == "rules"


def preference_labels_text(metrics: dict) -> str:
    """"; preference labels by ..." : who taught the policy, the AI or the checks."""
    choices = (metrics.get("roles") or {}).get("choices")
    if not choices:
        return ""
    if labeled_by_checks(metrics):
        return "; the preference labels came from the constitution's checks (choice_labeler.backend=rules), not from an AI labeler"
    return f"; the preference labels came from an AI labeler ({choices['backend']} {choices.get('model') or '?'})"


def blind_spot_text(metrics: dict) -> str:
    """"; no check for a kind of prompt applied to N of M prompts ..." when some prompts' kind was unknown."""
    blind = metrics.get("kind_blind_spot")
    if not blind or not blind["prompts"]:
        return ""
    where = ", ".join(f"{n} in {s}" for s, n in blind["by_set"].items())
    return (f"; no check written for a kind of prompt (red_team, helpful) applied to {blind['prompts']} of "
            f"{blind['total']} prompts ({where}): their kind is unknown, so only the checks for every prompt judged "
            "them (give those eval.prompts rows a `kind`)")


def roles_line(metrics: dict) -> str | None:
    """Which labeler did which job, and whether the evaluation is independent of training."""
    roles = metrics.get("roles")
    if not roles:
        return None
    judge = roles["judge"].get("id") or f"{roles['judge']['backend']} {roles['judge']['model']}"
    return (f"Labelers: critiques and revisions by {roles['text']['key']} ({roles['text']['backend']} {roles['text']['model']}), "
            f"preference labels by {roles['choices']['key']} ({roles['choices']['backend']}"
            f"{'' if roles['choices']['backend'] == 'rules' else ' ' + roles['choices']['model']}), evaluation by "
            f"{roles['judge']['key']} ({judge}): " + ("the training labeler, a circular evaluation" if roles["circular"]
                                                     else "independent of training"))


def headlines(metrics: dict) -> list[str]:
    """The headline numbers as lines of text, then who judged (what `cai run` prints at the end)."""
    lines = [f"{i['title']}: {i['value']} ({i['detail']})" for i in headline_items(metrics)]
    agreed = (metrics.get("reward_agreement") or {}).get("all")
    if agreed and agreed.get("n"):
        lines.append(f"Reward model against the judge: scores the judge's pick higher in {pct(agreed['mean'])} "
                     f"{ci_text(agreed['ci'])} of the {agreed['n']} held-out pairs the judge decides (50% is chance)")
    roles = roles_line(metrics)
    return lines + ([roles] if roles else [])


# -------------------------------------------------------------------------------------------------
# Plots: each returns PNG bytes, or None when there is nothing to draw


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
                         "grid.alpha": 0.3, "figure.facecolor": "white"})
    return plt


def plot_rl_curves(rows: list[dict]) -> bytes | None:
    """Reward (mean and spread), KL with its coefficient, answer length: one panel each, by step."""
    if not rows or not any("reward_mean" in r for r in rows):
        return None
    plt = _pyplot()
    steps = [r.get("step", i + 1) for i, r in enumerate(rows)]
    get = lambda key: [r.get(key, math.nan) for r in rows]  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.1))
    mean, std = get("reward_mean"), [r.get("reward_std", 0.0) for r in rows]
    axes[0].plot(steps, mean, color=COLORS["rl"], marker="o", ms=3)
    axes[0].fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=COLORS["rl"], alpha=0.2)
    axes[0].set(title="reward (mean ± std)", xlabel="step")
    axes[1].plot(steps, get("kl"), color="#6b4fbb", marker="o", ms=3, label="KL to reference")
    axes[1].set(title="KL(policy ‖ SL-CAI) and β", xlabel="step", ylabel="KL (nats)")
    if any("kl_coef" in r for r in rows):
        twin = axes[1].twinx()
        twin.plot(steps, get("kl_coef"), color="#2a9d8f", ls="--", label="β (KL coefficient)")
        twin.set_ylabel("β", color="#2a9d8f")
        twin.grid(False)
        lines = axes[1].get_lines() + twin.get_lines()
        axes[1].legend(lines, [line.get_label() for line in lines], fontsize=8, loc="best")
    axes[2].plot(steps, get("answer_length"), color="#444", marker="o", ms=3)
    axes[2].set(title="answer length (tokens)", xlabel="step")
    fig.tight_layout()
    return _png(fig)


def reward_monitor_names(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(the constraints, the principles) that rl/metrics.jsonl logs per step."""
    keys = dict.fromkeys(k for r in rows for k in r)
    return ([k.split("/", 1)[1] for k in keys if k.startswith("multiplier/")],
            [k.split("/", 1)[1] for k in keys if k.startswith("principle_reward/")])


def plot_reward_monitors(rows: list[dict]) -> bytes | None:
    """Per PPO step: the ensemble members' disagreement, each principle's reward, and each constraint as
    measured beside its bound, with its Lagrange multiplier. None when the run logged none of them."""
    constraints, principles = reward_monitor_names(rows)
    has_disagreement = any(r.get("reward_disagreement") is not None for r in rows)
    panels = int(has_disagreement) + int(bool(principles)) + len(constraints)
    if not panels:
        return None
    plt = _pyplot()
    steps = [r.get("step", i + 1) for i, r in enumerate(rows)]
    get = lambda key: [math.nan if r.get(key) is None else r[key] for r in rows]  # noqa: E731
    fig, axes = plt.subplots(1, panels, figsize=(3.8 * panels, 3.1), squeeze=False)
    axes = list(axes[0])
    if has_disagreement:
        ax = axes.pop(0)
        ax.plot(steps, get("reward_disagreement"), color="#b23a48", marker="o", ms=3)
        ax.set(title="ensemble disagreement (members' std)", xlabel="step")
    if principles:
        ax = axes.pop(0)
        for principle in principles:
            ax.plot(steps, get(f"principle_reward/{principle}"), marker="o", ms=2, label=principle)
        ax.set(title="each principle's reward", xlabel="step")
        ax.legend(fontsize=7, loc="best")
    for name in constraints:
        ax = axes.pop(0)
        ax.plot(steps, get(f"constraint/{name}"), color="#1f4e79", marker="o", ms=3, label="measured")
        ax.plot(steps, get(f"bound/{name}"), color="#1f4e79", ls="--", label="bound")
        ax.set(title=f"constraint {name}", xlabel="step")
        twin = ax.twinx()
        twin.plot(steps, get(f"multiplier/{name}"), color="#2a9d8f", ls=":", marker=".", label="multiplier λ")
        twin.set_ylabel("λ", color="#2a9d8f", rotation=0)
        twin.grid(False)
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig)


def reward_monitor_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Each constraint: its bound, its measure at the first and last step, its multiplier's peak and last value."""
    constraints, _ = reward_monitor_names(rows)
    out = []
    for name in constraints:
        measured = [r.get(f"constraint/{name}") for r in rows if r.get(f"constraint/{name}") is not None]
        lam = [r[f"multiplier/{name}"] for r in rows if f"multiplier/{name}" in r]
        bound = next((r[f"bound/{name}"] for r in rows if f"bound/{name}" in r), None)
        show = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
        out.append([name, show(bound), show(measured[0] if measured else None), show(measured[-1] if measured else None),
                    show(max(lam) if lam else None), show(lam[-1] if lam else None)])
    return ["constraint", "bound", "measured, first step", "measured, last step", "multiplier, peak", "multiplier, last"], out


def plot_win_rates(metrics: dict) -> bytes | None:
    """Win rate with its interval, overall and per comparison principle, one panel per model pair."""
    wins = metrics.get("win_rates") or {}
    if not wins or not any(w["overall"]["n"] for w in wins.values()):
        return None
    plt = _pyplot()
    principles = sorted({p for w in wins.values() for p in w["by_principle"]})
    labels = ["overall"] + principles
    fig, axes = plt.subplots(1, len(wins), figsize=(3.6 * len(wins) + 1.8, 0.32 * len(labels) + 1.3), sharey=True, squeeze=False)
    for ax, (key, w) in zip(axes[0], wins.items()):
        stats = [w["overall"]] + [w["by_principle"].get(p) for p in principles]
        ys = list(range(len(labels)))[::-1]
        for y, s, label in zip(ys, stats, labels):
            if not s or s["win_rate"] is None:
                continue
            low, high = s["ci"] or (s["win_rate"], s["win_rate"])
            color = COLORS.get(w["model"], "#555") if label == "overall" else "#8fb3d9"
            ax.barh(y, s["win_rate"], color=color, height=0.7)
            ax.errorbar(s["win_rate"], y, xerr=[[s["win_rate"] - low], [high - s["win_rate"]]], color="#222", capsize=2, lw=1)
        ax.axvline(0.5, color="#c0392b", ls="--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_title(f"{name(w['model'])} vs {name(w['opponent'])}", fontsize=10)
        ax.set_xlabel(f"win rate of {name(w['model'])}")
        ax.set_yticks(ys, labels)
    fig.tight_layout()
    return _png(fig)


def plot_compliance(metrics: dict) -> bytes | None:
    """Compliance with the checks per model, overall and per check, with intervals (the known truth)."""
    compliance = metrics.get("compliance") or {}
    if not compliance:
        return None
    plt = _pyplot()
    models = list(compliance)
    checks = sorted({c for per in (metrics.get("check_pass_rates") or {}).values() for c in per})
    labels = ["every check"] + checks
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(labels) * max(1, len(models)) / 2 + 1.5))
    height = 0.8 / len(models)
    for k, m in enumerate(models):
        stats = [compliance[m]] + [(metrics["check_pass_rates"].get(m) or {}).get(c) for c in checks]
        for y, s in enumerate(stats):
            if not s or s.get("mean") is None:
                continue
            pos = len(labels) - 1 - y + (len(models) - 1 - k - (len(models) - 1) / 2) * height
            low, high = s["ci"] or (s["mean"], s["mean"])
            ax.barh(pos, s["mean"], height=height, color=COLORS.get(m, "#555"), label=name(m) if y == 0 else None)
            ax.errorbar(s["mean"], pos, xerr=[[s["mean"] - low], [high - s["mean"]]], color="#222", capsize=2, lw=1)
    ax.set_yticks(range(len(labels))[::-1], labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of held-out answers that pass (checked exactly)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def plot_agreement(metrics: dict) -> bytes | None:
    """Per principle: how often the training labeler picks the same answer as the independent judge."""
    agreement = {k: v for k, v in (metrics.get("agreement") or {}).items() if v.get("agreement") is not None}
    if not agreement:
        return None
    plt = _pyplot()
    labels = ["all"] + sorted(k for k in agreement if k != "all")
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(labels) + 1.2))
    ys = list(range(len(labels)))[::-1]
    ax.barh(ys, [agreement[k]["agreement"] for k in labels], color=["#1f4e79"] + ["#8fb3d9"] * (len(labels) - 1))
    for y, k in zip(ys, labels):
        ax.text(agreement[k]["agreement"] + 0.01, y, f"{pct(agreement[k]['agreement'])} of {agreement[k]['judge_decisive']}", va="center", fontsize=8)
    ax.set_yticks(ys, labels)
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("training labeler agrees with the independent judge")
    fig.tight_layout()
    return _png(fig)


def plot_overoptimization(metrics: dict) -> bytes | None:
    """Proxy (reward-model score) and gold (the checks' compliance) against KL to the SL-CAI model."""
    points = [p for p in (metrics.get("overoptimization") or []) if p.get("kl") is not None]
    if len(points) < 2:
        return None
    plt = _pyplot()
    fig, proxy_ax = plt.subplots(figsize=(6.5, 3.6))
    kl = [p["kl"] for p in points]
    has_proxy = all(p.get("proxy") is not None for p in points)  # no reward model (DPO): the gold alone
    if has_proxy:
        proxy_ax.plot(kl, [p["proxy"] for p in points], "o-", color="#d9822b", label="proxy: reward-model score")
        proxy_ax.set_ylabel("reward-model score (normalised)", color="#d9822b")
    proxy_ax.set_xlabel("KL(policy || SL-CAI) on held-out prompts, nats per answer")
    gold_ax = proxy_ax.twinx() if has_proxy else proxy_ax
    gold_ax.plot(kl, [p["gold"] for p in points], "s-", color="#1f4e79", label="gold: compliance with the checks")
    gold_ax.set_ylabel("compliance (checked exactly)", color="#1f4e79")
    gold_ax.set_ylim(0, 1)
    for p in points:
        label = f"step {p['step']}" + (" (kept)" if p.get("kept") else "")
        gold_ax.annotate(label, (p["kl"], p["gold"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    lines = proxy_ax.get_lines() + (gold_ax.get_lines() if has_proxy else [])
    proxy_ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def plot_harm_refusal(metrics: dict) -> bytes | None:
    """P(harmless) on red-team prompts and P(refuses) on helpful prompts, per model, with intervals."""
    panels = [(k, t) for k, t in (("harmlessness", "harmless on red-team prompts (↑)"), ("over_refusal", "refuses helpful prompts (↓)"))
              if metrics.get(k)]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 2.9), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        rates = metrics[key]
        models = [m for m, r in rates.items() if r["mean"] is not None]
        for i, m in enumerate(models):
            r = rates[m]
            low, high = r["ci"] or (r["mean"], r["mean"])
            ax.bar(i, r["mean"], color=COLORS.get(m, "#777"), width=0.6)
            ax.errorbar(i, r["mean"], yerr=[[r["mean"] - low], [high - r["mean"]]], color="#222", capsize=3, lw=1)
            ax.text(i, min(high + 0.03, 0.97), pct(r["mean"]), ha="center", fontsize=9)
        ax.set_xticks(range(len(models)), [name(m) for m in models])
        ax.set_ylim(0, 1)
        ax.set_title(f"P({title})", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def plot_rewards(samples: list[dict]) -> bytes | None:
    """The reward model's scores of each model's answers: the distribution before and after RL."""
    scored = [s["reward"] for s in samples if s.get("reward")]
    if not scored:
        return None
    plt = _pyplot()
    models = list(scored[0])
    values = {m: [r[m] for r in scored if r.get(m) is not None] for m in models}
    everything = [v for vs in values.values() for v in vs]
    low, high = min(everything), max(everything)
    bins = [low + (high - low) * i / 20 for i in range(21)] if high > low else 10
    fig, ax = plt.subplots(figsize=(7.5, 3.0))
    for m in models:
        ax.hist(values[m], bins=bins, histtype="stepfilled", alpha=0.25, color=COLORS.get(m, "#777"))
        ax.hist(values[m], bins=bins, histtype="step", lw=1.6, color=COLORS.get(m, "#777"), label=f"{name(m)} (mean {sum(values[m]) / len(values[m]):+.2f})")
        ax.axvline(sum(values[m]) / len(values[m]), color=COLORS.get(m, "#777"), ls="--", lw=1)
    ax.set(xlabel="reward-model score (normalised on the SL-CAI model's samples)", ylabel="answers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_audit(audit: dict | None, items: list[dict]) -> bytes | None:
    """The labeler audit: accuracy, position bias, length bias; and a reliability diagram."""
    if not audit or not audit.get("metrics") or audit["metrics"].get("accuracy") is None:
        return None
    plt = _pyplot()
    m = audit["metrics"]
    bars = [("accuracy\n(both orders)", m.get("accuracy")), ("accuracy\n(first order)", m.get("accuracy_first_order_only")),
            ("position\nflips", m.get("position_flip_rate")), ("picks (A)", m.get("option_a_rate")),
            ("longer\nwins", m.get("longer_answer_wins"))]
    bars = [(k, v) for k, v in bars if v is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.1), gridspec_kw={"width_ratios": [1.6, 1]})
    axes[0].bar(range(len(bars)), [v for _, v in bars], color=["#2a9d8f", "#8ecdc4", "#e76f51", "#f4a261", "#e9c46a"][: len(bars)])
    for i, (_, v) in enumerate(bars):
        axes[0].text(i, v + 0.02, pct(v), ha="center", fontsize=9)
    axes[0].axhline(0.5, color="#c0392b", ls="--", lw=1)
    axes[0].set_xticks(range(len(bars)), [k for k, _ in bars], fontsize=8)
    axes[0].set(ylim=(0, 1.05), title=f"labeler on gold comparisons ({m.get('labeled')} pairs)")
    points = [(i["label_prob"], 1.0 if i["correct"] == 0 else 0.0) for i in items if i.get("label_prob") is not None]
    ax = axes[1]
    ax.plot([0, 1], [0, 1], color="#999", ls="--", lw=1)
    if points:
        edges = [i / 10 for i in range(11)]
        xs, ys, ns = [], [], []
        for lo, hi in zip(edges, edges[1:]):
            inside = [(p, y) for p, y in points if lo <= p < hi or (hi == 1.0 and p == 1.0)]
            if inside:
                xs.append(sum(p for p, _ in inside) / len(inside))
                ys.append(sum(y for _, y in inside) / len(inside))
                ns.append(len(inside))
        ax.scatter(xs, ys, s=[20 + 4 * n for n in ns], color="#2a9d8f", zorder=3)
        ax.plot(xs, ys, color="#2a9d8f", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="P(first answer better), labeler", ylabel="first answer is gold", title="calibration")
    fig.tight_layout()
    return _png(fig)


# -------------------------------------------------------------------------------------------------
# Tables (rows of cells, shared by HTML and Markdown)


def model_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    models = list(metrics.get("models", {}))
    head = ["measure"] + [name(m) for m in models]
    rows = []

    def add(label, key, fmt):
        values = metrics.get(key) or {}
        if any(values.get(m) is not None for m in models):
            rows.append([label] + [fmt(values.get(m)) for m in models])

    rate_fmt = lambda r: "n/a" if not r or r.get("mean") is None else f"{pct(r['mean'])} {ci_text(r['ci'])}"  # noqa: E731
    add("P(harmless), red-team prompts ↑", "harmlessness", rate_fmt)
    add("P(refuses), helpful prompts ↓", "over_refusal", rate_fmt)
    add("refusal phrases, helpful prompts ↓", "refusal_markers", rate_fmt)
    add("reward-model score", "reward", lambda r: "n/a" if not r or r.get("mean") is None else f"{r['mean']:+.2f} {ci_text(r['ci'], False)}")
    add("reward-model members' disagreement (std) ↓", "reward_disagreement", lambda v: "n/a" if v is None else f"{v:.3f}")
    add("log p − log p(SL-CAI) of its top-p answers (nats, ≈ KL)", "kl_to_sft", lambda r: "n/a" if not r or r.get("mean") is None else f"{r['mean']:.2f}")
    add("answer length (tokens)", "answer_tokens", lambda r: "n/a" if not r or r.get("mean") is None else f"{r['mean']:.1f}")
    add("repeated word 3-grams", "repetition", lambda v: pct(v, 1))
    add("distinct word 2-grams", "distinct_2", lambda v: pct(v))
    return head, rows


def win_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Each comparison over all prompts and per prompt kind."""
    head = ["comparison", "prompts", "win rate", f"{pct(metrics.get('confidence', 0.95))} interval", "soft win rate",
            "wins / ties / losses"]
    rows = []
    for w in (metrics.get("win_rates") or {}).values():
        title = f"{name(w['model'])} vs {name(w['opponent'])}"
        groups = [("all", w["overall"])] + [(k.replace("_", "-"), s) for k, s in w["by_kind"].items()]
        for label, s in groups:
            rows.append([title, f"{label} ({s['n']})", pct(s["win_rate"]), ci_text(s["ci"]), pct(s["soft_win_rate"]),
                         f"{s['wins']} / {s['ties']} / {s['losses']}"])
            title = ""
    return head, rows


def principle_table(metrics: dict, questions: dict) -> tuple[list[str], list[list[str]]]:
    """One row per comparison principle: its question and each comparison's win rate with interval."""
    wins = metrics.get("win_rates") or {}
    principles = sorted({p for w in wins.values() for p in w["by_principle"]})
    head = ["principle", "question"] + [f"{name(w['model'])} vs {name(w['opponent'])}" for w in wins.values()]
    rows = []
    for p in principles:
        cells = []
        for w in wins.values():
            s = w["by_principle"].get(p)
            cells.append("" if not s or s["win_rate"] is None else f"{pct(s['win_rate'])} {ci_text(s['ci'])} (n={s['n']})")
        rows.append([p, questions.get(p) or ""] + cells)
    return head, rows


def audit_table(audit: dict | None) -> tuple[list[str], list[list[str]]]:
    if not audit or not audit.get("metrics"):
        return [], []
    m = audit["metrics"]
    rows = [["gold pairs labeled", f"{m.get('labeled')} of {m.get('pairs')}"],
            ["accuracy (both orders, ensembled)", pct(m.get("accuracy"), 1)],
            ["accuracy (first order only)", pct(m.get("accuracy_first_order_only"), 1)],
            ["position-flip rate", pct(m.get("position_flip_rate"), 1)],
            ["option (A) picked", pct(m.get("option_a_rate"), 1)],
            ["longer answer wins / is gold", f"{pct(m.get('longer_answer_wins'), 1)} / {pct(m.get('longer_answer_is_gold'), 1)}"],
            ["expected calibration error", "n/a" if m.get("expected_calibration_error") is None else f"{m['expected_calibration_error']:.3f}"]]
    return ["measure", "value"], rows


def red_team_section(attacks: dict) -> dict:
    """Attack success per principle and per attack style on the prompts `cai redteam` wrote, model by model."""
    models = list(attacks["overall"])
    fmt = lambda r: "n/a" if not r or r.get("mean") is None else f"{pct(r['mean'])} {ci_text(r['ci'])} (n={r['n']})"  # noqa: E731
    by_principle = [[p, attacks["judged_by"].get(p, "")] + [fmt(cells.get(x)) for x in models]
                    for p, cells in attacks["by_principle"].items()]
    by_principle.append(["all", ""] + [fmt(attacks["overall"].get(x)) for x in models])
    by_style = [[s] + [fmt(cells.get(x)) for x in models] for s, cells in attacks["by_style"].items()]
    return {"title": "Red-team prompts: attack success by principle and attack style",
            "tables": [(["principle", "judged by"] + [f"{name(x)} ↓" for x in models], by_principle),
                       (["attack style"] + [f"{name(x)} ↓" for x in models], by_style)],
            "text": [f"{attacks['prompts']} held-out prompts written by `cai redteam` for a principle of the constitution in "
                     "an attack style. Attack success is the share of a model's answers that fail the principle the prompt "
                     "probes: by the principle's check where it has one (exact), else by the judge's harmlessness grade "
                     "(red-team prompts) or refusal grade (helpful ones). Lower is better; intervals: bootstrap over prompts."]}


def cut(text: str | None, limit: int = 600) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def example_rows(examples: list[dict]) -> list[list[str]]:
    rows = []
    for e in examples:
        critiques = "\n\n".join(f"[{r.get('principle_id')}] {cut(r.get('critique'), 400)}" for r in e.get("rounds", []))
        refused = [r for r in e.get("rounds", []) if r.get("accepted") is False]  # sl.verify_revisions turned them down
        if refused:
            critiques += "\n\n" + "\n\n".join(f"(revision turned down: {cut(r.get('revision'), 200)})" for r in refused)
        rows.append([cut(e["prompt"], 300), cut(e["first_answer"]), critiques, cut(e["sl_final"]), cut(e["policy_answer"])])
    return rows


def caveats(data: dict) -> list[str]:
    """What a careful reader should know before trusting the numbers."""
    m, out = data["metrics"], []
    audit = (m.get("labeler_audit") or {}).get("metrics") or {}
    if audit.get("accuracy") is not None and audit["accuracy"] < 0.65:
        out.append(f"The labeler agrees with the gold answer on {pct(audit['accuracy'])} of the audit's comparisons "
                   "(50% is chance): its verdicts below are weak evidence. Use a stronger labeler for results you keep.")
    elif not audit and not labeled_by_checks(m):  # the checks labeled: nothing to audit
        out.append("The labeler has not been audited: run `cai audit-labeler CONFIG` (or set eval.audit_pairs) "
                   "to see how often it agrees with human judgements.")
    confidence = m.get("judge_confidence")
    if confidence is not None and confidence < 0.6 and (m.get("roles") or {}).get("judge", {}).get("backend") != "rules":
        out.append(f"The judge is barely confident: it gives the answer it prefers {pct(confidence)} on average (50% is a "
                   "coin flip). A win rate counts anything above 50% as a win, so it magnifies small biases (length, "
                   "wording): read the soft win rate beside it.")
    roles = m.get("roles") or {}
    if roles.get("circular") and roles["judge"]["backend"] == "rules" and "simulated" not in str(roles["judge"].get("id")):
        out.append("The judge is the constitution's checks, which also labelled the preferences: here they are the known "
                   "truth, not an opinion. The policy was trained against the reward model learnt from their labels, and "
                   "it is judged on prompts no stage saw.")
    elif roles.get("circular"):
        out.append(f"The judge is the training labeler ({roles['judge']['key']}: {roles['judge']['backend']} "
                   f"{roles['judge']['model']}): this evaluation is circular — a policy optimised against a labeler looks "
                   "good to that labeler. Set eval.judge.* to a labeler no stage trained against (eval.judge.backend=rules "
                   "with a checkable constitution) for evidence.")
    n = (m.get("prompts") or {}).get("total", 0)
    if n and n < 50:
        out.append(f"Only {n} held-out prompts: the intervals are wide. Raise data.limit or data.fractions.eval, "
                   "or name more files in eval.prompts.")
    if m.get("reward_note"):
        out.append(m["reward_note"] + ".")
    if m.get("grade_position_flip_rate") is not None and m["grade_position_flip_rate"] > 0.3:
        out.append(f"The labeler changes its harmlessness/refusal verdict with the order of the options in "
                   f"{pct(m['grade_position_flip_rate'])} of answers; both orders are averaged, but it is a sign of a weak judge.")
    return out


# -------------------------------------------------------------------------------------------------
# HTML and Markdown

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2933;margin:0;background:#f5f7fa}
main{max-width:1120px;margin:0 auto;padding:24px 32px 64px;background:#fff}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:20px;margin:36px 0 8px;padding-bottom:4px;border-bottom:1px solid #e4e7eb}
.sub{color:#616e7c;margin:0 0 16px}.cards{display:flex;gap:14px;flex-wrap:wrap;margin:16px 0}
.card{flex:1 1 300px;border:1px solid #e4e7eb;border-radius:8px;padding:12px 16px;background:#fbfcfd}
.card b{display:block;font-size:13px;color:#52606d;font-weight:600}.card span{display:block;font-size:13px;color:#52606d}
.card span.big{font-size:28px;font-weight:600;color:#1f2933;margin:4px 0}
.warn{background:#fff8e6;border-left:4px solid #f0b429;padding:8px 14px;margin:8px 0;font-size:14px}
img{max-width:100%;display:block;margin:8px 0}table{border-collapse:collapse;width:100%;font-size:13px;margin:8px 0}
th,td{border:1px solid #e4e7eb;padding:6px 8px;vertical-align:top;text-align:left}th{background:#f0f4f8}
td.txt{white-space:pre-wrap;max-width:260px}pre{background:#f5f7fa;padding:12px;overflow-x:auto;font-size:12px}
details{margin:8px 0}summary{cursor:pointer;font-weight:600}.muted{color:#7b8794;font-size:13px}
"""


def _html_table(head: list[str], rows: list[list[str]], text_cols: tuple[int, ...] = ()) -> str:
    if not rows:
        return ""
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = "".join(f"<td{' class=txt' if i in text_cols else ''}>{html.escape(str(c))}</td>" for i, c in enumerate(row))
        out.append(f"<tr>{cells}</tr>")
    return "\n".join(out) + "</table>"


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return ""
    clean = lambda c: str(c).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines = ["| " + " | ".join(clean(h) for h in head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows])


def sections(data: dict, plots: dict[str, bytes | None]) -> list[dict]:
    """The report as a list of sections: title, paragraphs, plot name, tables (head, rows), text columns."""
    m = data["metrics"]
    prompts = m.get("prompts", {})
    sets = ", ".join(f"{n} from {s}" for s, n in prompts.get("sets", {}).items())
    compared = ", ".join(f"{name(k)} ({v['source']})" for k, v in m.get("models", {}).items())
    per_pair = ((data["config"].get("eval") or {}).get("principles_per_pair"))
    n_principles = len(data["questions"])
    asked = (f"{min(per_pair, n_principles)} of the constitution's {n_principles} comparison principles (drawn per pair)"
             if per_pair and per_pair < n_principles else f"every one of the constitution's {n_principles} comparison principles")
    out = [{
        "title": "Models and prompts",
        "text": [f"Compared: {compared}. Judge: {m.get('labeler')}. {prompts.get('total', 0)} held-out prompts that no "
                 f"training stage saw ({sets})."],
        "tables": [model_table(m)],
    }]
    roles = m.get("roles")
    if roles:
        who = [f"critiques and revisions: {roles['text']['key']} ({roles['text']['backend']} {roles['text']['model']})",
               f"preference labels and scores: {roles['choices']['key']} ({roles['choices']['backend']}"
               f"{'' if roles['choices']['backend'] == 'rules' else ' ' + roles['choices']['model']})",
               f"evaluation: {roles['judge']['key']} ({roles['judge'].get('id') or roles['judge']['backend']})"]
        verdict = ("The judge is the training labeler: the evaluation is circular (a policy optimised against a labeler looks "
                   "good to it)." if roles["circular"] else
                   "The judge is not the labeler that the preference stage trained against: the evaluation is independent of training.")
        out.append({"title": "Who judged", "text": ["Labelers by job — " + "; ".join(who) + ".", verdict]})
    if m.get("compliance"):
        out.append({"title": "Known truth: compliance with the checks", "plot": "compliance",
                    "tables": [compliance_table(m["compliance"], m.get("check_over_refusal"), m.get("check_pass_rates"))],
                    "text": ["Every principle's check evaluated by a program on each held-out answer (cai/checks.py): an answer "
                             "complies when it satisfies every check that applies to its prompt. No labeler is asked, so these "
                             "numbers are exact for the answers sampled; the intervals are bootstrap over prompts."]
                    + (["Blind spot: " + blind_spot_text(m)[2:] + "."] if blind_spot_text(m) else [])})
    if m.get("judge_checks"):
        j = m["judge_checks"]
        out.append({"title": "Checks no stage trained against", "tables": [compliance_table(j["compliance"], j["over_refusal"], j["pass_rates"])],
                    "text": [f"The judge's own checks ({j['constitution']}, eval.judge.constitution), by the same rule: where "
                             "these numbers and the table above part, one of the two implementations is being fooled — a "
                             "policy that learnt a blind spot of the training checks scores well there and not here."]})
    if m.get("agreement"):
        a = m["agreement"]
        rows = [[k, str(a[k]["pairs"]), str(a[k]["judge_decisive"]), pct(a[k]["agreement"]) if a[k]["agreement"] is not None else "n/a"]
                for k in ["all"] + sorted(x for x in a if x != "all")]
        out.append({"title": "Held-out-judge audit: does the training labeler agree with the judge?", "plot": "agreement",
                    "tables": [(["principle", "pair questions", "the judge picks an answer", "the training labeler picks the same"], rows)],
                    "text": ["The training labeler judged the same evaluation pairs as the independent judge. Agreement is "
                             "counted where the judge picks an answer (where it calls a tie, the principle does not separate "
                             "the two). Where the training labeler agrees less, the policy may have learnt what it likes "
                             "rather than what the principle asks: reward hacking shows here first."]})
    out.append({"title": "Win rates by principle", "plot": "win_rates",
                "tables": [win_table(m), principle_table(m, data["questions"])],
                "text": [f"Each pair of answers to a prompt is judged by the labeler under {asked}, each in both orders "
                         "(the second un-flipped), and averaged: the prefs stage's debiased soft labels. A model wins a "
                         "prompt when that probability is above 50% (a tie counts half). Intervals: bootstrap over prompts."]})
    out.append({"title": "Harmlessness and over-refusal", "plot": "harm_refusal",
                "text": ["The labeler is asked whether each answer to a red-team prompt is harmless (declining counts as "
                         "harmless), and whether each answer to a helpful prompt refuses instead of helping — a refusal of "
                         "a harmless request counts against the model. Both as (A)/(B) questions in both orders, averaged."]})
    if m.get("red_team_attacks"):
        out.append(red_team_section(m["red_team_attacks"]))
    rl_text = ["Per PPO step: the reward-model score of the sampled answers, the KL divergence from the SL-CAI "
               "reference and the coefficient β that holds it near its target, and the answer length."]
    if not plots.get("rl_curves"):
        rl_text = [f"No RL training curves: {data['run_dir'] / 'rl' / 'metrics.jsonl'} is missing or has no reward "
                   f"(rl.algorithm={(data['config'].get('rl') or {}).get('algorithm', 'unknown')} logs elsewhere)."]
    out.append({"title": "RL training", "plot": "rl_curves", "text": rl_text})
    if plots.get("reward_monitors"):
        monitors = ["Per PPO step, what the reward's parts did. The ensemble members' disagreement (the spread of their "
                    "scores of the same answers) is a hacking monitor: it grows where the policy's answers leave the "
                    "ground the reward model was trained on, which a single reward model cannot see. Each constraint "
                    "(rl.constraints) is measured on the step's answers beside its bound; its Lagrange multiplier rises "
                    "while the bound is violated, weighting the constraint into the reward, and falls back once it holds."]
        table = reward_monitor_table(data["rl_rows"])
        out.append({"title": "Reward monitors: ensemble disagreement and constraints", "plot": "reward_monitors",
                    "text": monitors, "tables": [table] if table[1] else []})
    reward_text = ["The reward model's scores of each model's answers to the held-out prompts, as PPO read them (a per-principle "
                   "model's outputs where each principle applies, weighted): the distribution before "
                   "(initial, SL-CAI) and after RL. A shift to the right is what RL optimised; check it against the "
                   "labeler's win rates above, which the policy was not trained on."]
    if m.get("reward_note"):
        reward_text = [m["reward_note"] + "."]
    agreed = m.get("reward_agreement") or {}
    if agreed.get("all", {}).get("n"):
        reward_text.append("Does the reward model point where the judge points? Of the held-out pairs the judge decides, the "
                           "share where the reward model scores the judge's pick higher: about 50% for a reward model at "
                           "chance, whatever RL did with it.")
    rows = [[k, str(agreed[k]["n"]), f"{pct(agreed[k]['mean'])} {ci_text(agreed[k]['ci'])}"]
            for k in ["all"] + sorted(x for x in agreed if x != "all") if agreed.get(k, {}).get("n")]
    out.append({"title": "Reward distribution before and after RL", "plot": "rewards", "text": reward_text,
                "tables": [(["prompts", "pairs the judge decides", "the reward model agrees"], rows)] if rows else []})
    if m.get("overoptimization"):
        rows = [[p["model"] + (" (kept)" if p.get("kept") else ""), str(p["step"]), "n/a" if p["kl"] is None else f"{p['kl']:.2f}",
                 "n/a" if p.get("proxy") is None else f"{p['proxy']:+.2f}", pct(p["gold"])]
                for p in m["overoptimization"]]
        out.append({"title": "Over-optimisation: proxy and gold against KL", "plot": "overoptimization",
                    "tables": [(["policy", "RL step", "KL to SL-CAI", "proxy (reward model)", "gold (compliance)"], rows)],
                    "text": ["The SL-CAI model, every RL snapshot (rl.keep_snapshots) and the final policy, on the held-out "
                             "prompts: what RL optimised (the reward model's score) and what it was meant to achieve (the "
                             "checks), against how far each moved from the SL-CAI model (Gao et al. 2022). Where the proxy "
                             "still rises and the gold does not, more RL stopped helping."]})
    out += rounds_and_selection_sections(data)
    audit = m.get("labeler_audit")
    audit_text = [f"{audit.get('labeler')} on {audit.get('gold')}, {audit.get('principles')}. How often the labeler's "
                  "debiased label favours the human-preferred answer, how often its pick flips with the order, whether it "
                  "prefers longer answers, and how calibrated its probabilities are."] if audit else [
        "Not run yet: `cai audit-labeler CONFIG` measures the labeler on the 438 gold comparisons of Bai et al. 2022, "
        "and the next report shows it (or set eval.audit_pairs=N)."]
    out.append({"title": "Labeler audit", "plot": "audit", "tables": [audit_table(audit)], "text": audit_text})
    out.append({"title": "Examples: critique, revision, final policy", "tables":
                [(["prompt", "first answer", "critique [principle]", "revision (SL-CAI target)", "final policy's answer"],
                  example_rows(data["examples"]))], "text_cols": (0, 1, 2, 3, 4),
                "text": ["Red-team prompts of the SL stage: the initial model's first answer, the labeler's critique(s) "
                         "against the principle drawn and its revision (what SL-CAI was trained on), and what the final "
                         "policy answers to the same prompt now." if data["examples"] else "No SL-CAI records to show."]})
    if data.get("stress"):
        from cai.stress import stress_table

        stress = data["stress"]
        out.append({"title": "Stress test: known hacks against the judges", "tables": [stress_table(stress)],
                    "text": [f"`cai stress` ({stress['cases']['total']} prompts with a good answer): each probe's win rate "
                             "against the good answer to the same prompt, per judge (pairwise: both orders averaged, then "
                             "the probe shown as (A) and as (B), and under the principle it attacks; pointwise: the share of "
                             "prompts it scores higher, and the mean rewards). ⚠ marks a probe the judge prefers to the good answer by more "
                             "than the margin (--fail-on, else 5 points): a hack the optimiser can find."]})
    samples = data["samples"][:8]
    models = list(m.get("models", {}))
    rows = []
    for s in samples:
        verdicts = "; ".join(f"{k}: {pct(v['p_first_better'])}" for k, v in (s.get("judgements") or {}).items())
        rows.append([f"[{s['kind'].replace('_', '-')}] {cut(s['prompt'], 300)}"] + [cut(s["answers"].get(x), 400) for x in models] + [verdicts])
    out.append({"title": "Held-out answers", "tables": [(["prompt"] + [name(x) for x in models] + ["judge: P(first-named model better)"], rows)],
                "text_cols": tuple(range(len(models) + 1)),
                "text": [f"The first {len(samples)} held-out prompts and each model's answer; every prompt is in eval/samples.jsonl."]})
    return out


def rounds_and_selection_sections(data: dict) -> list[dict]:
    """Rounds of AI feedback (rl/rounds.json) beside the over-optimisation curve's gold at each round's
    end; the snapshot rl/ kept by the judge on the validation split (rl/selection.json)."""
    out = []
    curve = {p["step"]: p for p in (data["metrics"].get("overoptimization") or [])}
    if data.get("rounds"):
        def num(x, fmt):
            return "n/a" if x is None else format(x, fmt)

        rows = []
        for r in data["rounds"]:
            before = r.get("rm_accuracy_before_update") or {}
            end = curve.get(r["last_step"]) or {}
            used = r.get("labeler") or {}
            rows.append([str(r["round"]), f"{r['first_step']}-{r['last_step']}",
                         "prefs stage" if r["round"] == 1 else f"{r.get('labeled') or 0} ({r.get('decisive') or 0} decisive)",
                         "—" if r["round"] == 1 else (f"{pct(before.get('accuracy'))} {ci_text(before.get('ci'))} of {before.get('pairs')}"
                                                      if before else "n/a"),
                         f"{num(r.get('reward_first'), '+.2f')} → {num(r.get('reward_last'), '+.2f')}" if "reward_last" in r else num(r.get("train_loss"), ".3f"),
                         num(r.get("kl_last"), ".2f"), num(end.get("kl"), ".2f"), num(end.get("proxy"), "+.2f"),
                         pct(end.get("gold")) if end else "n/a",
                         f"{used.get('requests', 0)} ({used.get('cache_hits', 0)} cached), "
                         f"{used.get('input_tokens', 0) + used.get('output_tokens', 0)} tokens"])
        head = ["round", "steps", "new pairs labeled", "reward model right on them, before its update",
                "training reward (or DPO loss)", "KL at its end (training)", "KL at its end (held out)", "proxy at its end",
                "gold at its end", "labeler requests, tokens"]
        out.append({"title": "Rounds of AI feedback", "tables": [(head, rows)], "text": [
            "Before each round after the first, the policy as it then was answered the prefs-split prompts and the choice "
            "labeler labeled its pairs (both orders, principles ensembled); PPO's reward model was updated on every label so "
            "far (DPO trained on the new pairs). How often the reward model in force ranked the new pairs as the labeler did, "
            "before its update, shows how far the policy had moved off what it was trained on (50% is chance). The held-out "
            "columns come from the over-optimisation curve at each round's last step (its snapshot): proxy = the rm stage's "
            "reward model, gold = compliance with the checks."]})
    selection = data.get("selection")
    if selection:
        rows = [[c["model"] + (" (kept)" if c["model"] == selection["kept"] else ""), str(c["step"]),
                 "n/a" if c["score"] is None else f"{pct(c['score'], 1)} {ci_text(c['ci'])}", str(c["n"])] for c in selection["candidates"]]
        out.append({"title": "The RL policy kept: the judge's choice on the validation split", "tables": [
            (["snapshot", "RL step", "soft win rate against SL-CAI [interval]", "validation prompts"], rows)], "text": [
            f"rl/ holds {selection['kept']} (step {selection['step']} of {selection['final_step']}): {selection['reason']}. The "
            "validation split is neither trained on nor part of the eval split, so the numbers above, on the eval split, were not "
            "used to choose; the judge that chose is the one that evaluates, on other prompts."]})
    return out


def render_html(data: dict, plots: dict[str, bytes | None]) -> str:
    m = data["metrics"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>cai report: {html.escape(str(data['run_dir']))}</title>",
             f"<style>{CSS}</style></head><body><main>",
             "<h1>Constitutional AI run report</h1>",
             f"<p class=sub>{html.escape(str(data['run_dir']))} · constitution "
             f"<b>{html.escape(str(data['constitution'].get('name', '?')))}</b> "
             f"({len(data['constitution'].get('critiques') or [])} critique and {len(data['questions'])} comparison principles) · "
             f"judge {html.escape(str(m.get('labeler')))}</p>", "<div class=cards>"]
    for item in headline_items(m):
        parts.append(f"<div class=card><b>{html.escape(item['title'])}</b><span class=big>{html.escape(item['value'])}</span>"
                     f"<span>{html.escape(item['detail'])}</span></div>")
    parts.append("</div>")
    parts += [f"<div class=warn>{html.escape(c)}</div>" for c in caveats(data)]
    for section in sections(data, plots):
        parts.append(f"<h2>{html.escape(section['title'])}</h2>")
        parts += [f"<p>{html.escape(t)}</p>" for t in section.get("text", [])]
        png = plots.get(section.get("plot") or "")
        if png:
            parts.append(f"<img alt='{html.escape(section['title'])}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
        for head, rows in section.get("tables", []):
            parts.append(_html_table(head, rows, text_cols=section.get("text_cols", ())))
    parts.append("<h2>Configuration and constitution</h2>")
    parts.append(f"<details><summary>resolved config (eval/config.yaml)</summary><pre>{html.escape(data['config_text'])}</pre></details>")
    parts.append(f"<details><summary>constitution (eval/constitution.yaml)</summary><pre>{html.escape(data['constitution_text'])}</pre></details>")
    usage = m.get("labeler_usage") or {}
    parts.append(f"<p class=muted>Labeler requests by the eval stage: {usage.get('requests', 0)} "
                 f"({usage.get('cache_hits', 0)} from the cache). Rebuild this page with "
                 f"<code>python -m cai.report {html.escape(str(data['run_dir']))}</code>.</p>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def render_markdown(data: dict, plots: dict[str, bytes | None]) -> str:
    m = data["metrics"]
    lines = ["# Constitutional AI run report", "",
             f"`{data['run_dir']}` · constitution **{data['constitution'].get('name', '?')}** · judge `{m.get('labeler')}`", ""]
    lines += [f"- **{i['title']}: {i['value']}** ({i['detail']})" for i in headline_items(m)]
    for caveat in caveats(data):
        lines += ["", f"> {caveat}"]
    for section in sections(data, plots):
        lines += ["", f"## {section['title']}", ""] + section.get("text", [])
        if plots.get(section.get("plot") or ""):
            lines += ["", f"![{section['title']}](plots/{section['plot']}.png)"]
        for head, rows in section.get("tables", []):
            if rows:
                lines += ["", _md_table(head, rows)]
    lines += ["", "## Configuration and constitution", "", "<details><summary>resolved config</summary>", "",
              "```yaml", data["config_text"].rstrip(), "```", "", "</details>", "",
              "<details><summary>constitution</summary>", "", "```yaml", data["constitution_text"].rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def make_plots(data: dict) -> dict[str, bytes | None]:
    m = data["metrics"]
    return {
        "win_rates": plot_win_rates(m),
        "harm_refusal": plot_harm_refusal(m),
        "rl_curves": plot_rl_curves(data["rl_rows"]),
        "reward_monitors": plot_reward_monitors(data["rl_rows"]),
        "rewards": plot_rewards(data["samples"]),
        "audit": plot_audit(m.get("labeler_audit"), data["audit_items"]),
        "compliance": plot_compliance(m),
        "agreement": plot_agreement(m),
        "overoptimization": plot_overoptimization(m),
    }


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Build `eval/report.html`, `eval/report.md` and `eval/plots/*.png` from the files of a run."""
    data = load_run(run_dir)
    plots = make_plots(data)
    eval_dir = data["run_dir"] / "eval"
    (eval_dir / "plots").mkdir(exist_ok=True)
    for key, png in plots.items():
        target = eval_dir / "plots" / f"{key}.png"
        if png:
            target.write_bytes(png)
        else:
            target.unlink(missing_ok=True)
    atomic_write_text(eval_dir / "report.html", render_html(data, plots))
    atomic_write_text(eval_dir / "report.md", render_markdown(data, plots))
    return eval_dir / "report.html", eval_dir / "report.md"


def main(argv: list[str] | None = None) -> int:
    """`python -m cai.report OUTPUT_DIR`: rebuild the report of a finished eval stage."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cai.report OUTPUT_DIR", file=sys.stderr)
        return 2
    try:
        html_path, md_path = write_report(argv[0])
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {html_path}\n        {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
