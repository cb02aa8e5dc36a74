"""The command line: every bad input gives one line naming the cause, a non-zero exit, nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cai.cli import main
from tests.conftest import ROOT


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cai", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def one_error_line(stderr: str) -> str:
    """The single `error:` line (progress bars of a first model conversion may precede it)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_constitution_check_and_show(capsys):
    assert main(["constitution", "check", "constitutions/harmless.yaml", "constitutions/tiny.yaml"]) == 0
    assert main(["constitution", "show", "constitutions/tiny.yaml"]) == 0
    out = capsys.readouterr().out
    assert "harmful" in out and "less_harmful" in out


def test_constitution_check_names_the_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nversion: 1\ncritiques:\n  - id: a\n    critique: ''\n    revision: r\n")
    assert main(["constitution", "check", "constitutions/tiny.yaml", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "critique" in err and "tiny.yaml" not in err


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["constitution=missing.yaml"], "missing.yaml"),
        (["policy.model=no-such-alias"], "unknown model 'no-such-alias'"),
        (["sl.roundz=2"], "unknown key 'sl.roundz'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, overrides, expected):
    result = run_cli("sl", "configs/quickstart.yaml", f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path}", *overrides)
    assert result.returncode == 2
    assert expected in one_error_line(result.stderr)
    assert not (tmp_path / "run" / "sl" / "DONE").exists()


def test_dataset_without_the_column(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"question": "hi"}\n')
    result = run_cli("sl", "configs/quickstart.yaml", f"output_dir={tmp_path / 'run'}", f"data.red_team={data}")
    assert result.returncode == 2
    assert "has no column 'prompt'" in one_error_line(result.stderr)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run_cli("sl", "configs/quickstart.yaml", f"output_dir={locked / 'run'}")
    assert result.returncode == 2
    assert "not writable" in one_error_line(result.stderr)


def test_output_folder_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli("sl", "configs/quickstart.yaml", f"output_dir={blocker / 'run'}")
    assert result.returncode == 2
    assert "not writable" in one_error_line(result.stderr)


def test_sft_before_sl_names_the_missing_stage(tmp_path):
    result = run_cli("sft", "configs/quickstart.yaml", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "run `cai sl CONFIG` first" in one_error_line(result.stderr)


def test_help_lists_stages():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("sl", "sft", "run", "constitution", "config-keys"):
        assert word in result.stdout


def test_cache_stats_and_clear(tmp_path, capsys):
    import json

    from cai.labelers.base import GenerateRequest
    from cai.labelers.cache import CachedLabeler
    from tests.fakes import ScriptedLabeler

    cache = CachedLabeler(ScriptedLabeler(), tmp_path / "labeler_cache.sqlite")
    cache.generate([GenerateRequest([{"role": "user", "content": f"q{i}"}]) for i in range(3)])
    cache.close()
    assert main(["cache", "stats", "configs/quickstart.yaml", f"cache_dir={tmp_path}"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 3
    assert main(["cache", "clear", "configs/quickstart.yaml", f"cache_dir={tmp_path}"]) == 0
    assert "removed 3" in capsys.readouterr().out
    assert main(["cache", "stats", "configs/quickstart.yaml", f"cache_dir={tmp_path}"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 0
