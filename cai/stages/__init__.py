"""The pipeline's stages, in order, and what every stage folder holds.

Each stage is one module with `run(cfg) -> Path`. Stages talk only through files under
`cfg.output_dir`, so any stage reruns on its own. `open_stage` gives each the same life cycle:

- the stage's fingerprint is a hash of the config sections it (and every stage before it) reads,
  plus the constitution's and templates' contents; keys that only change how fast or how far a run
  goes (batch sizes, concurrency, request caps) are left out, so raising a cap resumes;
- same fingerprint and a DONE marker: the stage is skipped;
- same fingerprint, no marker: a partial run, resumed;
- another fingerprint: the folder is cleared and the stage reruns (and says so).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cai.config import Config, config_hash, to_yaml
from cai.constitution import constitution_sha256
from cai.errors import CaiError
from cai.records import (
    DONE,
    FINGERPRINT,
    atomic_write_json,
    atomic_write_text,
    ensure_writable,
    is_done,
    mark_done,
    package_versions,
)

STAGES = ("sl", "sft", "prefs", "rm", "rl", "eval")

# Config sections each stage reads (cumulatively, earlier stages' sections count too).
STAGE_SECTIONS = {
    "sl": ("seed", "constitution", "policy", "labeler", "choice_labeler", "data", "sl"),
    "sft": ("sft",),
    "prefs": ("prefs",),
    "rm": ("rm",),
    "rl": ("rl",),
    "eval": ("eval",),
}
STAGE_TEMPLATES = {
    "sl": ("answer.jinja", "critique.jinja", "revision.jinja"),
    "prefs": ("compare.jinja", "compare_cot.jinja"),
    "eval": ("harmlessness.jinja", "refusal.jinja"),
}
# Keys that change speed or limits, not results.
OPERATIONAL_KEYS = {
    "policy": {"batch_size"},
    "labeler": {
        "batch_size", "concurrency", "requests_per_minute", "tokens_per_minute", "timeout",
        "max_tries", "max_requests", "max_cost", "prices", "cache",
    },
    "sft": {"activation_checkpointing"},
    "rm": {"activation_checkpointing"},
}
OPERATIONAL_KEYS["choice_labeler"] = OPERATIONAL_KEYS["labeler"]


def stage_fingerprint(cfg: Config, stage: str) -> str:
    from cai.templates import Templates

    dumped = cfg.model_dump(mode="json")
    parts: dict = {}
    templates: list[str] = []
    for name in STAGES[: STAGES.index(stage) + 1]:
        for section in STAGE_SECTIONS[name]:
            value = dumped.get(section)
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in OPERATIONAL_KEYS.get(section, ())}
            parts[section] = value
        templates += STAGE_TEMPLATES.get(name, ())
    parts["constitution_sha256"] = constitution_sha256(cfg.constitution)
    parts["templates"] = Templates(cfg.templates).fingerprint(templates)
    return config_hash(parts)


@dataclass
class Stage:
    name: str
    path: Path
    fingerprint: str
    done: bool
    resumed: bool
    started: float

    def finish(self, summary: str) -> Path:
        mark_done(self.path, self.fingerprint)
        print(f"[{self.name}] done in {time.time() - self.started:.0f}s: {summary} -> {self.path}")
        return self.path


def stage_dir(cfg: Config, stage: str) -> Path:
    return Path(cfg.output_dir).expanduser() / stage


def require_done(cfg: Config, stage: str, needed_by: str) -> Path:
    """The folder of an earlier stage, or one line naming the stage that makes it."""
    path = stage_dir(cfg, stage)
    if not (path / DONE).exists():
        raise CaiError(f"{needed_by} needs the output of the {stage} stage ({path}); run `cai {stage} CONFIG` first")
    return path


def open_stage(cfg: Config, stage: str, force: bool = False) -> Stage:
    """Prepare `output_dir/<stage>/`: skip, resume or start afresh, and write the provenance files."""
    path = stage_dir(cfg, stage)
    fingerprint = stage_fingerprint(cfg, stage)
    started = time.time()
    if not force and is_done(path, fingerprint):
        print(f"[{stage}] already complete with this config, skipping ({path})")
        return Stage(stage, path, fingerprint, done=True, resumed=False, started=started)
    ensure_writable(path.parent)
    previous = (path / FINGERPRINT).read_text().strip() if (path / FINGERPRINT).exists() else None
    resumed = previous == fingerprint and not (path / DONE).exists() and not force
    if path.exists() and not resumed:
        if previous is not None and previous != fingerprint:
            print(f"[{stage}] config changed since the last run: rerunning {stage} from scratch")
        shutil.rmtree(path)
    ensure_writable(path)
    if resumed:
        print(f"[{stage}] resuming the unfinished run in {path}")
    atomic_write_text(path / FINGERPRINT, fingerprint + "\n")
    atomic_write_text(path / "config.yaml", to_yaml(cfg))
    constitution = Path(cfg.constitution)
    atomic_write_text(path / "constitution.yaml", constitution.read_text())
    atomic_write_json(
        path / "provenance.json",
        {
            "stage": stage,
            "fingerprint": fingerprint,
            "constitution": str(constitution),
            "constitution_sha256": constitution_sha256(constitution),
            "versions": package_versions(),
        },
    )
    return Stage(stage, path, fingerprint, done=False, resumed=resumed, started=started)


__all__ = ["STAGES", "DONE", "Stage", "open_stage", "require_done", "stage_dir", "stage_fingerprint"]
