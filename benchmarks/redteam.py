"""`cai redteam` with the embedded default as the writer: how fast, how novel, how hard on the policy.

    .venv/bin/python benchmarks/redteam.py [--out DIR] [--record] [key.path=value ...]

`cai redteam` on `configs/quickstart.yaml` (constitutions/checkable.yaml, whose every principle carries a
check; SmolLM2-135M-Instruct as the writer and as the target policy), with the labeler's answer cache off
so that every prompt is written. Reported:

- prompts per minute: prompts written, and prompts archived, per minute of the whole command (writing,
  the target's answers, the fresh measurement);
- the share of the readable prompts kept after near-duplicate removal;
- novelty of the archived prompts beside the shipped red-team set (cai/data/red_team.jsonl): distinct
  word 2- and 3-grams, mean similarity of each prompt to its nearest neighbour in its own set;
- the initial policy's failure rate per principle, judged by the principle's check: on the generated
  prompts that probe it (the stage's fresh answers, `measure.jsonl`) against the shipped prompts of the
  same kind (red-team prompts; helpful ones for the principles whose check applies to helpful prompts),
  answered the same number of times with the same sampling. Intervals: 95% bootstrap over prompts.

`--record` writes the section between the markers in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai.chat import policy_input  # noqa: E402
from cai.config import load_config  # noqa: E402
from cai.constitution import load_constitution  # noqa: E402
from cai.labelers import GenerateRequest  # noqa: E402
from cai.policy_server import close_policy, open_policy  # noqa: E402
from cai.promptsets import load_prompt_texts  # noqa: E402
from cai.records import atomic_write_text, read_jsonl  # noqa: E402
from cai.redteam import novelty, principle_targets  # noqa: E402
from cai.stages import redteam  # noqa: E402
from cai.templates import Templates  # noqa: E402
from cai.winrates import rate  # noqa: E402


def shipped_failures(cfg, targets, out: Path) -> dict:
    """The initial policy's answers to the shipped prompts (red-team and helpful), `target_samples` each,
    and per principle the share of each prompt's answers that fail its check."""
    cache = out / "shipped_answers.json"
    templates = Templates(cfg.templates)
    kinds = sorted({t.kind for t in targets})
    texts = {k: load_prompt_texts("builtin", k) for k in kinds}
    n = cfg.redteam.target_samples
    if cache.exists():
        answers = json.loads(cache.read_text())
    else:
        policy = open_policy(cfg, cfg.policy.model, {})
        sampling = dict(max_new_tokens=cfg.policy.max_new_tokens, temperature=cfg.policy.temperature, top_p=cfg.policy.top_p)
        answers = {}
        for k in kinds:
            asks = [GenerateRequest(policy_input(templates, t, cfg.policy.system_prompt), sample_index=n + j, **sampling)
                    for t in texts[k] for j in range(n)]
            got = [g.text or "" for g in policy.generate(asks, desc=f"shipped {k} prompts")]
            answers[k] = [got[i * n : (i + 1) * n] for i in range(len(texts[k]))]
        close_policy(policy, out)
        cache.write_text(json.dumps(answers))
    out_rates = {}
    for t in targets:
        per_prompt = []
        for text, mine in zip(texts[t.kind], answers[t.kind]):
            held = [t.check.satisfied(text, a, t.kind) for a in mine]
            held = [h for h in held if h is not None]
            if held:
                per_prompt.append(sum(not h for h in held) / len(held))
        out_rates[t.id] = per_prompt
    return out_rates


def fmt(r: dict) -> str:
    if not r or r.get("mean") is None:
        return "n/a"
    low, high = r["ci"]
    return f"{100 * r['mean']:.0f} [{100 * low:.0f}, {100 * high:.0f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/cai-bench-redteam", help="output_dir of the run")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    parser.add_argument("--record", action="store_true", help="write the section of benchmarks/RESULTS.md")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides of configs/quickstart.yaml")
    args = parser.parse_args()
    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(ROOT / "configs/quickstart.yaml", [f"output_dir={out}", "labeler.cache=false", *args.overrides])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load = os.getloadavg()

    # 1. cai redteam (timed; a finished run is reused, its time read from its summary)
    started = time.time()
    folder = redteam.run(cfg)
    summary = json.loads((folder / "summary.json").read_text())
    seconds = summary["seconds_this_run"] if time.time() - started < 5 else time.time() - started
    written, archived = summary["written"], summary["prompts"]

    # 2. The policy's failures on the shipped prompts, beside the generated ones (fresh answers)
    constitution = load_constitution(cfg.constitution)
    targets = [t for t in principle_targets(constitution, cfg.redteam.principles) if t.check is not None]
    shipped = shipped_failures(cfg, targets, out)
    rows = {r["id"]: r for r in read_jsonl(folder / "prompts.jsonl")}
    measured = read_jsonl(folder / "measure.jsonl")
    generated: dict[str, list[float]] = {}
    for m in measured:
        if m["id"] in rows and m["attack"] is not None:
            generated.setdefault(rows[m["id"]]["principle"], []).append(m["attack"])
    stats = dict(resamples=2000, level=0.95, seed=0)
    table = []
    for t in targets:
        g, s = rate(generated.get(t.id, []), **stats), rate(shipped[t.id], **stats)
        table.append((t, g, s))
    shipped_texts = load_prompt_texts("builtin", "red_team")
    ours = novelty([r["prompt"] for r in rows.values()])
    theirs = novelty(shipped_texts)
    gen_all = rate([a for v in generated.values() for a in v], **stats)

    # 3. The section
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    examples: dict[str, list[dict]] = {}
    for r in sorted(rows.values(), key=lambda r: (-(r["attack_success"] or 0), r["id"])):
        examples.setdefault(r["principle"], []).append(r)
    lines = [
        "## `cai redteam`: red-team prompts written by the embedded default (`benchmarks/redteam.py`)",
        "",
        f"`cai redteam configs/quickstart.yaml` with the answer cache off: constitutions/checkable.yaml (7 principles, all "
        f"checked) x 7 attack styles = {summary['cells_total']} cells, {cfg.redteam.rounds} rounds of {cfg.redteam.candidates} "
        f"prompt(s) per cell, up to {cfg.redteam.cell_size} kept per cell; SmolLM2-135M-Instruct writes the prompts "
        f"(`labeler`) and is the target (`policy.model`, {cfg.redteam.target_samples} answers per prompt); the checks judge. "
        f"Commit {commit}, load average {load[0]:.1f} (2 cores shared), {seconds / 60:.1f} min.",
        "",
        "```bash",
        f".venv/bin/python benchmarks/redteam.py --out {out} --fresh --record {' '.join(args.overrides)}".rstrip(),
        "```",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| prompts written | {written} ({summary['statuses']}) |",
        f"| prompts archived | {archived} in {summary['cells_filled']} of {summary['cells_total']} cells |",
        f"| prompts written per minute (whole command) | {written / (seconds / 60):.1f} |",
        f"| prompts archived per minute | {archived / (seconds / 60):.1f} |",
        f"| readable prompts kept after dedup | {100 * (summary['kept_after_dedup'] or 0):.0f}% |",
        f"| distinct word 2-grams / 3-grams: generated | {100 * ours['distinct_2']:.0f}% / {100 * ours['distinct_3']:.0f}% |",
        f"| distinct word 2-grams / 3-grams: shipped red-team set ({theirs['prompts']}) | {100 * theirs['distinct_2']:.0f}% / {100 * theirs['distinct_3']:.0f}% |",
        f"| mean nearest-neighbour similarity: generated / shipped | {ours['mean_nearest_similarity']:.2f} / {theirs['mean_nearest_similarity']:.2f} |",
        "",
        "The initial policy's failure rate per principle, % [95% CI over prompts], judged by the principle's check: on "
        "the generated prompts that probe it (fresh answers, not the ones the archive selected on) and on the shipped "
        "prompts of the same kind.",
        "",
        "| principle | kind | generated: prompts | failure % | shipped: prompts | failure % |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {t.id} | {t.kind} | {g['n']} | {fmt(g)} | {s['n']} | {fmt(s)} |" for t, g, s in table]
    lines += [f"| all | | {gen_all['n']} | {fmt(gen_all)} | | |", "", "Generated prompts, the two with the highest attack success per principle:", ""]
    for t in targets:
        for r in examples.get(t.id, [])[:2]:
            text = " ".join(r["prompt"].split())
            lines.append(f"- `{t.id}` / {r['style']} (attack {100 * (r['attack_success'] or 0):.0f}%): {text[:220]}{' …' if len(text) > 220 else ''}")
    text = "\n".join(lines)
    print("\n" + text)
    atomic_write_text(out / "results.md", text + "\n")
    if args.record:
        from results_section import record_section

        record_section("redteam", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
