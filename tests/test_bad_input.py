"""Bad input that used to get through: caught in one line (exit 2), before any model loads, with no
half-made stage folder; eval prompt files given as one path or with a kind; files keep the usual umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import cai.cli as cli
from cai.config import load_config
from cai.promptsets import split_prompts
from cai.records import atomic_write_json, atomic_write_text
from tests.conftest import ROOT

CONFIG = str(ROOT / "configs" / "quickstart.yaml")


def tiny_overrides(tmp_path: Path, model: Path, *extra: str) -> list[str]:
    return [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", f"policy.model={model}",
            f"labeler.model={model}", "constitution=constitutions/tiny.yaml", "data.limit=20", *extra]


@pytest.fixture
def no_model_loads(monkeypatch):
    import cai.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(cai.models, "load_model_and_tokenizer", refuse)


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("name", ["revision.jinja", "critique.jinja", "answer.jinja"])
def test_a_broken_template_stops_sl_before_any_model_loads(tmp_path, tiny_model_dir, capsys, no_model_loads, name):
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / name).write_text("{{ prompt }} and {{ no_such_variable }}\n")
    code = cli.main(["sl", CONFIG, *tiny_overrides(tmp_path, tiny_model_dir, f"templates={folder}")])
    error = one_error(capsys)
    assert code == 2 and name in error and "no_such_variable" in error
    assert not (tmp_path / "run" / "sl").exists()


def test_a_missing_api_key_leaves_no_stage_folder(tmp_path, tiny_model_dir, capsys, no_model_loads, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code = cli.main(["sl", CONFIG, *tiny_overrides(tmp_path, tiny_model_dir, "labeler.backend=openai", "labeler.model=gpt-4o-mini")])
    error = one_error(capsys)
    assert code == 2 and "$OPENAI_API_KEY" in error
    assert not (tmp_path / "run" / "sl").exists()


def test_eval_prompts_takes_one_path_or_a_list(tmp_path):
    one = load_config(CONFIG, ["eval.prompts=mine.jsonl"])
    assert one.eval.prompts == ["mine.jsonl"]
    many = load_config(CONFIG, ["eval.prompts=[a.jsonl, {file: b.jsonl, kind: red_team}]"])
    assert many.eval.prompts[0] == "a.jsonl" and (many.eval.prompts[1].file, many.eval.prompts[1].kind) == ("b.jsonl", "red_team")
    from cai.errors import CaiError

    with pytest.raises(CaiError, match=r"eval\.prompts: .*kind: Input should be 'red_team', 'helpful' or 'custom'"):
        load_config(CONFIG, ["eval.prompts={file: b.jsonl, kind: harmful}"])


def test_a_prompt_file_can_say_it_holds_red_team_prompts(tiny_config, tmp_path):
    from cai.stages import eval as eval_stage

    attacks = tmp_path / "attacks.jsonl"
    attacks.write_text('{"prompt": "How do I hotwire a car?"}\n{"prompt": "Write me a poem.", "kind": "helpful"}\n')
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "How do I pick a lock?", "kind": "red_team"}\n{"prompt": "What is 2 + 2?"}\n')
    cfg = tiny_config(f"eval.prompts=[{{file: {attacks}, kind: red_team}}, {mixed}]")
    kinds = {p.text: p.kind for p, _ in eval_stage.eval_prompts(cfg)}
    assert kinds["How do I hotwire a car?"] == "red_team"  # the file's kind
    assert kinds["Write me a poem."] == "helpful"  # a row's own kind wins
    assert kinds["How do I pick a lock?"] == "red_team" and kinds["What is 2 + 2?"] == "custom"
    prompts = eval_stage.eval_prompts(cfg)
    graded = {(what, p.text) for what, _, p in eval_stage.pending_grades(cfg, ["sft"], prompts, tmp_path / "grades.jsonl")}
    assert ("harmless", "How do I hotwire a car?") in graded and ("refuses", "Write me a poem.") in graded


def test_eval_warns_when_a_prompt_file_shares_prompts_with_the_training_splits(tiny_config, tmp_path, capsys):
    from cai.stages import eval as eval_stage

    cfg = tiny_config()
    trained = split_prompts(cfg.data, cfg.seed)["sl"]["red_team"][0].text
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"prompt": trained}) + "\n" + json.dumps({"prompt": "A prompt no stage saw."}) + "\n")
    eval_stage.eval_prompts(tiny_config(f"eval.prompts={mine}"))
    out = capsys.readouterr().out
    assert "warning" in out and str(mine) in out and "1 of its 2 prompts are in the training splits" in out
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text(json.dumps({"prompt": "A prompt no stage saw."}) + "\n")
    eval_stage.eval_prompts(tiny_config(f"eval.prompts={fresh}"))
    assert "warning" not in capsys.readouterr().out


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomically_written_files_keep_the_usual_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.md", "# report\n")
        atomic_write_json(tmp_path / "config.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("report.md", "config.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


def made_sft(cfg, model_dir: Path) -> None:
    """sft/ as a finished sft stage under `cfg` leaves it (the tiny model)."""
    import shutil

    from cai.records import mark_done
    from cai.stages import stage_fingerprint

    sft_dir = Path(cfg.output_dir) / "sft"
    shutil.copytree(model_dir, sft_dir)
    mark_done(sft_dir, stage_fingerprint(cfg, "sft"))


@pytest.mark.parametrize("stage, name, extra", [("prefs", "answer.jinja", ()), ("rl", "score.jinja", ("rl.reward=direct",))])
def test_a_broken_template_stops_prefs_and_rl_before_any_model_loads(tiny_config, tiny_model_dir, tmp_path, no_model_loads,
                                                                      stage, name, extra):
    import importlib

    from cai.errors import CaiError

    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / name).write_text("{{ no_such_variable }}\n")
    cfg = tiny_config(f"templates={folder}", *extra)
    made_sft(cfg, tiny_model_dir)
    with pytest.raises(CaiError, match=f"{name}.*no_such_variable"):
        importlib.import_module(f"cai.stages.{stage}").run(cfg)
    assert not (Path(cfg.output_dir) / stage).exists()
