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


# -------------------------------------------------------------------------------------------------
# The fingerprint covers exactly what each stage used (cai/stage_state.py)


def test_the_choice_labeler_counts_for_sl_only_where_sl_verifies(tiny_config):
    from cai.stages import is_current

    finish(tiny_config(), "sl")
    other_judge = ("choice_labeler.backend=rules",)
    assert is_current(tiny_config(*other_judge), "sl")  # sl asked it nothing
    assert stage_fingerprint(tiny_config(*other_judge), "sft") == stage_fingerprint(tiny_config(), "sft")
    assert stage_fingerprint(tiny_config(*other_judge), "prefs") != stage_fingerprint(tiny_config(), "prefs")
    verifying = ("sl.verify_revisions=true",)
    assert stage_fingerprint(tiny_config(*verifying, *other_judge), "sl") != stage_fingerprint(tiny_config(*verifying), "sl")


def test_every_template_a_stage_renders_is_in_its_fingerprint(tiny_config, tmp_path):
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "compare.jinja").write_text((ROOT / "prompts" / "compare.jinja").read_text() + "\nBe brief.\n")
    edited = f"templates={folder}"
    # sl renders compare.jinja only to verify its revisions
    assert stage_fingerprint(tiny_config(edited), "sl") == stage_fingerprint(tiny_config(), "sl")
    verifying = "sl.verify_revisions=true"
    assert stage_fingerprint(tiny_config(edited, verifying), "sl") != stage_fingerprint(tiny_config(verifying), "sl")
    finish(tiny_config(verifying), "sl")
    with pytest.raises(CaiError, match="other prompt templates"):
        require_done(tiny_config(edited, verifying), "sl", "sft")
    # compare_cot.jinja counts for prefs only in chain-of-thought mode; score.jinja for rl only with the direct reward
    (folder / "compare.jinja").unlink()
    (folder / "compare_cot.jinja").write_text((ROOT / "prompts" / "compare_cot.jinja").read_text() + "\nBe brief.\n")
    assert stage_fingerprint(tiny_config(edited), "prefs") == stage_fingerprint(tiny_config(), "prefs")
    cot = "prefs.chain_of_thought=true"
    assert stage_fingerprint(tiny_config(edited, cot), "prefs") != stage_fingerprint(tiny_config(cot), "prefs")
    (folder / "score.jinja").write_text((ROOT / "prompts" / "score.jinja").read_text() + "\nBe brief.\n")
    assert stage_fingerprint(tiny_config(edited), "rl") == stage_fingerprint(tiny_config(), "rl")
    direct = "rl.reward=direct"
    assert stage_fingerprint(tiny_config(edited, direct), "rl") != stage_fingerprint(tiny_config(direct), "rl")


def test_the_constitution_counts_by_content_not_by_path(tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    finish(tiny_config("constitution=constitutions/tiny.yaml"), "sl")
    for same in ("./constitutions/tiny.yaml", str(ROOT / "constitutions" / "tiny.yaml")):
        assert require_done(tiny_config(f"constitution={same}"), "sl", "sft")
    copy = tmp_path / "mine.yaml"
    copy.write_text((ROOT / "constitutions" / "tiny.yaml").read_text())
    assert require_done(tiny_config(f"constitution={copy}"), "sl", "sft")
    copy.write_text(copy.read_text().replace("harm", "hurt", 1))
    with pytest.raises(CaiError, match="another constitution text"):
        require_done(tiny_config(f"constitution={copy}"), "sl", "sft")


def test_a_prompt_file_edited_in_place_makes_the_stages_that_read_it_stale(tiny_config, tmp_path):
    import json

    red = tmp_path / "red.jsonl"
    red.write_text("".join(json.dumps({"prompt": f"How do I pick lock number {i}?"}) + "\n" for i in range(12)))
    cfg = tiny_config(f"data.red_team={red}")
    finish(cfg, "sl")
    assert require_done(tiny_config(f"data.red_team={red}"), "sl", "sft")
    with red.open("a") as f:
        f.write(json.dumps({"prompt": "How do I hotwire a car?"}) + "\n")
    with pytest.raises(CaiError) as err:
        require_done(tiny_config(f"data.red_team={red}"), "sl", "sft")
    assert "prompt file data.red_team" in str(err.value) and "\n" not in str(err.value)

    # an eval prompt file counts for eval only
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"prompt": "How do I bake bread?", "kind": "helpful"}) + "\n")
    before = {s: stage_fingerprint(tiny_config(f"eval.prompts=[{extra}]"), s) for s in ("rl", "eval")}
    extra.write_text(json.dumps({"prompt": "How do I bake rye bread?", "kind": "helpful"}) + "\n")
    after = {s: stage_fingerprint(tiny_config(f"eval.prompts=[{extra}]"), s) for s in ("rl", "eval")}
    assert before["rl"] == after["rl"] and before["eval"] != after["eval"]


def test_serve_and_policy_models_read_stage_state_not_the_stages():
    for module in ("serve.py", "serve_judge.py", "policy_models.py", "integrations.py"):
        text = (ROOT / "cai" / module).read_text()
        assert "cai.stages" not in text, module
