"""Stages made under another config: refused by the stages that read them, in one line naming the key that
differs, and rerun by `cai run`."""

from __future__ import annotations

from pathlib import Path

import pytest

import cai.cli as cli
from cai.errors import CaiError
from cai.records import DONE
from cai.stages import STAGES, open_stage, require_done, stage_dir, stage_fingerprint
from tests.conftest import ROOT

CONFIG = str(ROOT / "configs" / "quickstart.yaml")


def finish(cfg, stage: str) -> None:
    made = open_stage(cfg, stage)
    if not made.done:
        made.finish("test")


def test_an_upstream_stage_made_under_another_config_is_refused_naming_the_key(tiny_config):
    before = tiny_config()
    finish(before, "sl")
    assert require_done(before, "sl", "sft") == stage_dir(before, "sl")
    # a key that only changes speed does not make it stale
    assert require_done(tiny_config("policy.batch_size=3"), "sl", "sft") == stage_dir(before, "sl")
    with pytest.raises(CaiError) as err:
        require_done(tiny_config("seed=1"), "sl", "sft")
    message = str(err.value)
    assert "\n" not in message and "seed=0 (now 1)" in message and "cai sl CONFIG" in message and "cai run" in message
    with pytest.raises(CaiError, match=r"sl\.rounds=1 \(now 2\)"):
        require_done(tiny_config("sl.rounds=2"), "sl", "sft")


def test_an_upstream_stage_made_with_another_template_is_refused(tiny_config, tmp_path):
    finish(tiny_config(), "sl")
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "answer.jinja").write_text("Answer briefly: {{ prompt }}\n")
    with pytest.raises(CaiError, match="other prompt templates"):
        require_done(tiny_config(f"templates={folder}"), "sl", "sft")


def test_the_cli_refuses_a_stale_upstream_stage_in_one_line_before_making_the_folder(tmp_path, tiny_model_dir, capsys):
    overrides = [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", f"policy.model={tiny_model_dir}",
                 f"labeler.model={tiny_model_dir}", "constitution=constitutions/tiny.yaml"]
    from cai.config import load_config

    finish(load_config(CONFIG, overrides), "sl")
    code = cli.main(["sft", CONFIG, *overrides, "seed=7"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "seed=0 (now 7)" in err[0]
    assert not (tmp_path / "run" / "sft").exists()


def test_cai_run_reruns_a_stale_upstream_stage_instead(tmp_path, monkeypatch, capsys):
    """Each stage stands in for the real one by what matters here: it reads the stage before it."""
    calls = []

    def fake_stage(name, cfg):
        calls.append(name)
        if name != "sl":
            require_done(cfg, STAGES[STAGES.index(name) - 1], name)
        finish(cfg, name)

    monkeypatch.setattr(cli, "run_stage", fake_stage)
    overrides = [f"output_dir={tmp_path / 'run'}", "constitution=constitutions/tiny.yaml"]
    assert cli.main(["run", CONFIG, *overrides, "--only", "sl"]) == 0
    assert cli.main(["run", CONFIG, *overrides, "--only", "sft"]) == 0
    calls.clear()
    assert cli.main(["run", CONFIG, *overrides, "seed=1", "--only", "prefs"]) == 0
    # prefs finds sft stale, sft finds sl stale: sl, then sft, then prefs are run again
    assert calls == ["prefs", "sft", "sl", "sft", "prefs"]
    from cai.config import load_config

    cfg = load_config(CONFIG, [*overrides, "seed=1"])
    for stage in ("sl", "sft", "prefs"):
        assert (Path(tmp_path / "run" / stage) / DONE).read_text().strip() == stage_fingerprint(cfg, stage)
    assert "rerunning sl first" in capsys.readouterr().out
