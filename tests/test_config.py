"""Config loading: every shipped config, dotted overrides, and one clear line for each mistake."""

from __future__ import annotations

import pytest

from cai.config import config_keys, load_config
from cai.errors import CaiError
from tests.conftest import ROOT

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert {"quickstart.yaml", "full.yaml"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_opens_with_its_command(path):
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# cai ") and path.name in first, f"{path.name} must open with the command that runs it"
    assert (ROOT / "constitutions").exists() and cfg.constitution.endswith(".yaml")


def test_overrides_are_typed_and_nested():
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["sl.rounds=3", "labeler.backend=anthropic", "labeler.base_url=null", "sft.learning_rate=1e-4"])
    assert cfg.sl.rounds == 3 and isinstance(cfg.sl.rounds, int)
    assert cfg.labeler.backend == "anthropic"
    assert cfg.labeler.base_url is None
    assert cfg.sft.learning_rate == pytest.approx(1e-4)


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(CaiError) as err:
        load_config(ROOT / "configs/quickstart.yaml", ["sl.round=3"])
    message = str(err.value)
    assert "unknown key 'sl.round'" in message and "sl.rounds" in message and "\n" not in message


def test_unknown_top_level_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: x\npolicyy:\n  model: y\n")
    with pytest.raises(CaiError, match=r"c.yaml: unknown key 'policyy'.*policy"):
        load_config(path)


def test_bad_value_names_key_and_value():
    with pytest.raises(CaiError, match=r"labeler.backend: .*'cohere'"):
        load_config(None, ["labeler.backend=cohere"])
    with pytest.raises(CaiError, match=r"sl.rounds"):
        load_config(None, ["sl.rounds=0"])


def test_yaml_syntax_error_gives_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("output_dir: x\nsl:\n  rounds: [1\n")
    with pytest.raises(CaiError, match=r"bad.yaml: line \d+"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(CaiError, match="config file not found"):
        load_config("nope.yaml")


def test_fractions_must_cover_the_splits():
    with pytest.raises(CaiError, match="data.fractions"):
        load_config(None, ["data.fractions={sl: 0.5, prefs: 0.5}"])


def test_every_key_has_help_text():
    rows = config_keys()
    assert len(rows) > 30
    assert all(help_text for _, help_text, _ in rows), [k for k, h, _ in rows if not h]
