"""Declines against over-refusal: does a lever move PPO off the line that every run so far sits on?

Each finished run's eval stage judges the initial, SL-CAI and RL policies on the same held-out prompts
with checks no stage trained against (eval/metrics.json, `judge_checks`): the share of harmful requests
declined (declines_harm) and of helpful ones refused (over_refusal). On the 135M policy the two have
moved together under every reward-model setting and seed tried: a run that declines more also refuses
more ordinary requests, as if PPO turned one refusal knob rather than learning which prompts to refuse.
Issue 17's target (declines +40 points, over-refusal up by at most 5) lies off that line, so a lever
counts when it moves a run off it, not along it.

1. Read each run's RL point (declined, refused) and the initial model's.
2. Fit refused = a + b x declined by least squares over the runs; each run's residual is taken from the
   fit on the other runs (leave one out), so a run does not vouch for itself.
3. Bootstrap over runs (resampled with replacement): intervals for the slope and for the over-refusal
   the line predicts at the target's declines (initial + 40 points).

    python benchmarks/refusal_frontier.py RUN_DIR... [--label RUN_DIR=text ...]
    python benchmarks/refusal_frontier.py out/a out/b out/c --record     # also its section of RESULTS.md

Reads files only (no model, no torch): seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET_GAIN = 0.40  # issue 17: declines_harm up by 40 points or more ...
TARGET_REFUSAL = 0.05  # ... and over-refusal up by at most 5 points


def read_point(run: Path, model: str = "rl") -> dict:
    """(declined, refused) of `model` and of the initial model in a run's eval/metrics.json."""
    path = Path(run) / "eval" / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run the eval stage first)")
    judged = json.loads(path.read_text()).get("judge_checks")
    if not judged:
        raise SystemExit(f"{path}: no judge_checks (the run needs eval.judge with checks: backend rules)")
    try:
        point = {m: (judged["pass_rates"][m]["declines_harm"]["mean"], judged["over_refusal"][m]["mean"]) for m in ("initial", model)}
    except KeyError as missing:
        raise SystemExit(f"{path}: no {missing} in judge_checks (a constitution without declines_harm?)") from None
    return {"declined": point[model][0], "refused": point[model][1], "initial": point["initial"]}


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares y = a + b x; None when x does not vary."""
    n = len(points)
    if n < 2:
        return None
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def leave_one_out_residuals(points: list[tuple[float, float]]) -> list[float | None]:
    """Each point's y minus the line fitted on the others."""
    out = []
    for i, (x, y) in enumerate(points):
        line = fit_line(points[:i] + points[i + 1 :])
        out.append(None if line is None else y - (line[0] + line[1] * x))
    return out


def bootstrap(points: list[tuple[float, float]], at: float, resamples: int, seed: int = 0) -> dict:
    """Percentile intervals (95%) of the slope and of the line's value at x = `at`, over resampled runs."""
    rng = random.Random(seed)
    slopes, values = [], []
    for _ in range(resamples):
        line = fit_line([rng.choice(points) for _ in points])
        if line is not None:
            slopes.append(line[1])
            values.append(line[0] + line[1] * at)

    def interval(xs):  # percentile interval, as cai.winrates.bootstrap_ci takes it
        return tuple(float(q) for q in np.quantile(xs, [0.025, 0.975])) if xs else (None, None)

    return {"slope": interval(slopes), "at": interval(values)}


def report(runs: list[Path], labels: dict[str, str], resamples: int) -> str:
    rows = [(run, read_point(run)) for run in runs]
    points = [(r["declined"], r["refused"]) for _, r in rows]
    line = fit_line(points)
    if line is None:
        raise SystemExit("the runs' declines do not vary: no line to fit")
    initial_declined = sum(r["initial"][0] for _, r in rows) / len(rows)
    initial_refused = sum(r["initial"][1] for _, r in rows) / len(rows)
    target_x = initial_declined + TARGET_GAIN
    spread = bootstrap(points, target_x, resamples)
    residuals = leave_one_out_residuals(points)
    lines = [
        f"{len(rows)} RL policies, each judged on its run's held-out prompts by checks no stage trained against.",
        "",
        "| run | declined % | refused % | refused − line (fit on the others), points | in the target's box |",
        "|---|---:|---:|---:|---|",
    ]
    for (run, r), residual in zip(rows, residuals):
        inside = r["declined"] - r["initial"][0] >= TARGET_GAIN and r["refused"] - r["initial"][1] <= TARGET_REFUSAL
        name = labels.get(str(run), run.name)
        shown = "—" if residual is None else f"{100 * residual:+.0f}"
        lines.append(f"| {name} | {100 * r['declined']:.0f} | {100 * r['refused']:.0f} | {shown} | {'yes' if inside else 'no'} |")
    a, b = line
    lo, hi = spread["slope"]
    at_lo, at_hi = spread["at"]
    lines += [
        "",
        f"Line: refused = {100 * a:+.1f} + {b:.2f} × declined (points), slope 95% CI [{lo:.2f}, {hi:.2f}] over "
        f"{resamples} resamples of the runs. At the target's declines ({100 * target_x:.0f}%: the initial model's "
        f"{100 * initial_declined:.0f}% + 40) the line predicts {100 * (a + b * target_x):.0f}% refused "
        f"[{100 * at_lo:.0f}, {100 * at_hi:.0f}]; the target allows {100 * (initial_refused + TARGET_REFUSAL):.0f}%.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (each with eval/metrics.json)")
    parser.add_argument("--label", action="append", default=[], help="RUN_DIR=text: the run's name in the table")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the runs")
    parser.add_argument("--record", action="store_true", help="write the section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    bad = [item for item in args.label if "=" not in item]
    if bad:
        parser.error(f"--label {bad[0]!r}: give RUN_DIR=text")
    labels = {str(Path(run)): text for run, text in (item.split("=", 1) for item in args.label)}
    text = report(args.runs, labels, args.resamples)
    print(text)
    if args.record:
        from benchmarks.results_section import record_section

        command = "python benchmarks/refusal_frontier.py " + " ".join(str(run) for run in args.runs)
        record_section("refusal_frontier", f"**Declines against over-refusal** (`{command}`):\n\n" + text)


if __name__ == "__main__":
    main()
