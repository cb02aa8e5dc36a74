"""A wheel built from the checkout carries what a user edits in the checkout: the constitutions and
the prompt templates (through the links cai/constitutions and cai/prompts), and the prompt data."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import ROOT


def test_the_wheel_carries_constitutions_templates_and_data(tmp_path):
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "source"
    for name in ("cai", "constitutions", "prompts"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    [wheel] = tmp_path.glob("cai-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, suffix in (("constitutions", ".yaml"), ("prompts", ".jinja")):
        shipped = {f"cai/{folder}/{p.name}" for p in (ROOT / folder).glob(f"*{suffix}")}
        assert shipped and shipped <= names, shipped - names
    assert "cai/data/red_team.jsonl" in names and "cai/data/hhh_438.jsonl" in names
    assert "cai/data/stress_probes.yaml" in names  # cai stress works from an installed wheel
    assert "cai/data/attack_styles.yaml" in names  # cai redteam's attack styles


def test_a_shipped_constitution_is_found_from_the_package_alone(tmp_path, monkeypatch):
    """As in an installed wheel: no checkout above the package, another working directory."""
    import cai.config as config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "PROJECT_ROOT", tmp_path / "nowhere")
    cfg = config.load_config(None, ["constitution=constitutions/tiny.yaml"])
    assert cfg.constitution == str(config.PACKAGE_DIR / "constitutions" / "tiny.yaml")
    from cai.templates import SHIPPED_PROMPTS

    assert (SHIPPED_PROMPTS / "critique.jinja").is_file()
