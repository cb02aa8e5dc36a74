"""The pipeline's stages, in order, and what every stage folder holds.

Each stage is one module with `run(cfg) -> Path`. Stages talk only through files under
`cfg.output_dir`, so any stage reruns on its own. `open_stage` gives each the same life cycle:

- the stage's fingerprint is a hash of the config sections it (and every stage before it) reads,
  plus the constitution's and templates' contents; keys that only change how fast or how far a run
  goes (batch sizes, concurrency, request caps) are left out, so raising a cap resumes;
- same fingerprint and a DONE marker: the stage is skipped;
- same fingerprint, no marker: a partial run, resumed;
- another fingerprint: the folder is cleared and the stage reruns (and says so).

A stage that reads an earlier stage's output (`require_done`) checks that it was made under the
current config: an upstream stage finished under another one (another seed, so other splits; an rm
trained on other pairs) is refused in one line naming the first key that differs, and `cai run`
reruns it instead.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cai.config import Config, config_hash, to_yaml
from cai.constitution import constitution_sha256
from cai.labelers import batch
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
# A folder under output_dir made by a command outside the pipeline's order (`cai redteam`, whose prompts
# a run reads only when data.* names them): the sections and templates it reads, on its own.
STANDALONE_SECTIONS = {"redteam": ("seed", "constitution", "policy", "labeler", "choice_labeler", "redteam")}
STAGE_TEMPLATES["redteam"] = ("redteam_write.jinja", "redteam_mutate.jinja", "answer.jinja", "compare.jinja")
# Keys that change speed or limits, not results.
OPERATIONAL_KEYS = {
    "policy": {"batch_size", "base_url", "served_model", "concurrency", "api_key_env"},
    "labeler": {
        "batch_size", "concurrency", "requests_per_minute", "tokens_per_minute", "timeout",
        "max_tries", "max_requests", "max_cost", "prices", "cache",
        "server_concurrency", "server_failures", "server_bench_seconds",
        "batch_api", "batch_poll_seconds", "batch_discount",
    },
    "sft": {"activation_checkpointing"},
    "rm": {"activation_checkpointing"},
    "eval": {"served_models"},
}
OPERATIONAL_KEYS["choice_labeler"] = OPERATIONAL_KEYS["labeler"]


def fingerprint_parts(cfg: Config, stage: str) -> dict:
    """What a stage's output depends on: the config sections it and the stages before it read (less the
    operational keys), the constitution's hash and the hash of the templates they render."""
    from cai.templates import Templates

    dumped = cfg.model_dump(mode="json")
    parts: dict = {}
    templates: list[str] = []
    for name in STAGES[: STAGES.index(stage) + 1] if stage in STAGES else (stage,):
        for section in STAGE_SECTIONS.get(name) or STANDALONE_SECTIONS[name]:
            value = dumped.get(section)
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in OPERATIONAL_KEYS.get(section, ())}
                if section == "labeler" and isinstance(value.get("base_url"), list):
                    value["base_url"] = "pool"  # adding or removing a server of a pool changes no answer
            parts[section] = value
        templates += STAGE_TEMPLATES.get(name, ())
        if name == "rl" and cfg.rl.reward == "direct":  # the labeler scores each answer with score.jinja
            templates.append("score.jinja")
    parts["constitution_sha256"] = constitution_sha256(cfg.constitution)
    parts["templates"] = Templates(cfg.templates).fingerprint(templates)
    return parts


def stage_fingerprint(cfg: Config, stage: str) -> str:
    return config_hash(fingerprint_parts(cfg, stage))


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out: dict = {}
        for key, child in value.items():
            out.update(_flatten(child, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def differing_key(before: dict, now: dict) -> tuple[str, object, object] | None:
    """(dotted key, value before, value now) of the first key whose value differs, in config order."""
    old, new = _flatten(before), _flatten(now)
    for key in list(new) + [k for k in old if k not in new]:
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            return key, old.get(key, "<unset>"), new.get(key, "<unset>")
    return None


class StaleStage(CaiError):
    """An upstream stage finished under another config; `stage` names it so that `cai run` can rerun it."""

    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


def made_under(cfg: Config, stage: str) -> str | None:
    """None when `stage` is finished under this config; else why not, as a phrase."""
    path = stage_dir(cfg, stage)
    if not (path / DONE).exists():
        return "not finished"
    if (path / DONE).read_text().strip() == stage_fingerprint(cfg, stage):
        return None
    provenance = path / "provenance.json"
    before = json.loads(provenance.read_text()).get("fingerprint_parts") if provenance.is_file() else None
    found = differing_key(before, fingerprint_parts(cfg, stage)) if isinstance(before, dict) else None
    if found is None:
        return "made under another config (see its config.yaml)"
    key, old, new = found
    if key == "constitution_sha256":
        return "made with another constitution text"
    if key == "templates":
        return "made with other prompt templates"
    return f"made with {key}={old!r} (now {new!r})"


def is_current(cfg: Config, stage: str) -> bool:
    """The stage is finished, under this config."""
    return made_under(cfg, stage) is None


@dataclass
class Stage:
    name: str
    path: Path
    fingerprint: str
    done: bool
    resumed: bool
    started: float

    def finish(self, summary: str) -> Path:
        if process_rank() != 0:  # under `accelerate launch`, the main process marks and reports
            return self.path
        mark_done(self.path, self.fingerprint)
        print(f"[{self.name}] done in {time.time() - self.started:.0f}s: {summary} -> {self.path}")
        return self.path


def stage_dir(cfg: Config, stage: str) -> Path:
    return Path(cfg.output_dir).expanduser() / stage


def require_done(cfg: Config, stage: str, needed_by: str) -> Path:
    """The folder of an earlier stage finished under this config, or one line naming the stage that makes
    it (and, when it was made under another config, the first key that differs)."""
    path = stage_dir(cfg, stage)
    if not (path / DONE).exists():
        raise CaiError(f"{needed_by} needs the output of the {stage} stage ({path}); run `cai {stage} CONFIG` first")
    why = made_under(cfg, stage)
    if why is not None:
        raise StaleStage(
            f"{needed_by} needs the {stage} stage made under this config, but {path} was {why}; "
            f"rerun it with `cai {stage} CONFIG [overrides]`, or `cai run`, which reruns it",
            stage,
        )
    return path


def process_rank() -> int:
    """This process's rank under `accelerate launch` or torchrun (0 when it runs alone)."""
    return int(os.environ.get("RANK", "0"))


def _await_main_process(stage: str, path: Path, fingerprint: str, started: float, timeout: float = 900.0) -> Stage:
    """Another process than the main one: wait until the main process has prepared the folder."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if is_done(path, fingerprint):
            return Stage(stage, path, fingerprint, done=True, resumed=False, started=started)
        marker = path / FINGERPRINT
        if marker.exists() and marker.read_text().strip() == fingerprint and (path / "provenance.json").exists():
            return Stage(stage, path, fingerprint, done=False, resumed=False, started=started)
        time.sleep(0.2)
    raise CaiError(f"process {process_rank()}: the main process did not prepare {path} within {timeout:.0f} s")


def open_stage(cfg: Config, stage: str, force: bool = False, uses_labeler: tuple[str, ...] = ()) -> Stage:
    """Prepare `output_dir/<stage>/`: skip, resume or start afresh, and write the provenance files.
    `uses_labeler` names the labeler roles the stage uses ("text", "choices", "judge"): their API keys
    are checked first, so a missing one leaves no folder.
    Under `accelerate launch`, only the main process prepares; the others wait for it."""
    path = stage_dir(cfg, stage)
    fingerprint = stage_fingerprint(cfg, stage)
    started = time.time()
    if process_rank() != 0:
        return _await_main_process(stage, path, fingerprint, started)
    if not force and is_done(path, fingerprint):
        print(f"[{stage}] already complete with this config, skipping ({path})")
        return Stage(stage, path, fingerprint, done=True, resumed=False, started=started)
    if uses_labeler:
        from cai.labelers import check_api_key

        check_api_key(cfg, uses_labeler)
    ensure_writable(path.parent)
    previous = (path / FINGERPRINT).read_text().strip() if (path / FINGERPRINT).exists() else None
    resumed = previous == fingerprint and not (path / DONE).exists() and not force
    if path.exists() and not resumed:
        if previous is not None and previous != fingerprint:
            print(f"[{stage}] config changed since the last run: rerunning {stage} from scratch")
        shutil.rmtree(path)
    ensure_writable(path)
    batch.stage_folder.set(path)  # where a labeler in batch mode writes its batch ids
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
            "fingerprint_parts": fingerprint_parts(cfg, stage),
            "versions": package_versions(),
        },
    )
    return Stage(stage, path, fingerprint, done=False, resumed=resumed, started=started)


__all__ = [
    "STAGES", "DONE", "Stage", "StaleStage", "is_current", "open_stage", "require_done", "stage_dir", "stage_fingerprint",
]
