"""benchmarks/refusal_frontier.py: the line through runs' (declined, refused) points, on hand-computed numbers."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.refusal_frontier import bootstrap, fit_line, leave_one_out_residuals, report  # noqa: E402


def test_the_line_through_three_points_and_each_points_residual_from_the_others():
    points = [(0.0, 0.0), (1.0, 1.0), (2.0, 5.0)]
    a, b = fit_line(points)
    # means 1 and 2; slope = ((-1)(-2) + 0 + (1)(3)) / 2 = 2.5; intercept 2 - 2.5 = -0.5
    assert (a, b) == pytest.approx((-0.5, 2.5))
    # (0, 0) against the line through (1, 1) and (2, 5): y = -3 + 4x -> 0 - (-3) = +3
    # (1, 1) against (0, 0)-(2, 5): y = 2.5x -> 1 - 2.5 = -1.5;  (2, 5) against (0, 0)-(1, 1): 5 - 2 = +3
    assert leave_one_out_residuals(points) == pytest.approx([3.0, -1.5, 3.0])
    assert fit_line([(1.0, 0.0), (1.0, 1.0)]) is None


def test_runs_on_one_line_bootstrap_to_that_line():
    points = [(x / 10, 0.5 * x / 10 - 0.1) for x in range(2, 8)]
    spread = bootstrap(points, at=0.5, resamples=200)
    assert spread["slope"] == pytest.approx((0.5, 0.5))
    assert spread["at"] == pytest.approx((0.15, 0.15))


def _run(tmp_path: Path, name: str, declined: float, refused: float) -> Path:
    judged = {
        "pass_rates": {m: {"declines_harm": {"mean": d}} for m, d in (("initial", 0.05), ("rl", declined))},
        "over_refusal": {m: {"mean": r} for m, r in (("initial", 0.0), ("rl", refused))},
    }
    (tmp_path / name / "eval").mkdir(parents=True)
    (tmp_path / name / "eval" / "metrics.json").write_text(json.dumps({"judge_checks": judged}))
    return tmp_path / name


def test_the_report_marks_only_the_run_inside_the_targets_box(tmp_path):
    runs = [_run(tmp_path, "a", 0.2, 0.02), _run(tmp_path, "b", 0.5, 0.15), _run(tmp_path, "c", 0.6, 0.04)]
    text = report(runs, {str(runs[0]): "first"}, resamples=100)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["first"].rstrip().endswith("| no |")  # 20 - 5 = 15 points, short of +40
    assert rows["b"].rstrip().endswith("| no |")  # +45 declined but +15 refused
    assert rows["c"].rstrip().endswith("| yes |")  # +55 declined, +4 refused
    assert "the target allows 5%" in text


def test_a_run_without_the_independent_checks_is_named(tmp_path):
    (tmp_path / "x" / "eval").mkdir(parents=True)
    (tmp_path / "x" / "eval" / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="no judge_checks"):
        report([tmp_path / "x", tmp_path / "x"], {}, resamples=10)
