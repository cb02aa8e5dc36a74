"""The pipeline's stages, in order, and what every stage folder holds.

Each stage is one module with `run(cfg) -> Path`. Stages talk only through files under
`cfg.output_dir`, so any stage reruns on its own. `open_stage` gives each the same life cycle:

- the stage's fingerprint (cai/stage_state.py) is a hash of exactly what it and every stage before it
  used: the config sections they read, the constitution's and prompt files' contents, the templates
  they render; keys that only change how fast or how far a run goes are left out, so raising a cap resumes;
- same fingerprint and a DONE marker: the stage is skipped;
- same fingerprint, no marker: a partial run, resumed;
- another fingerprint: the folder is cleared and the stage reruns (and says so).

Whether a finished folder is current (`is_current`, `require_done`, `made_under`, `stage_dir`) is
decided in cai/stage_state.py, below the stages, so that what reads a stage's output without being a
stage (`cai serve`, the rl stage's models) need not import this package; the names are re-exported here.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cai.config import Config, to_yaml
from cai.constitution import constitution_sha256
from cai.errors import CaiError
from cai.labelers import batch
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
from cai.stage_state import (  # noqa: F401 - re-exported: the stages and other branches import them from here
    OPERATIONAL_KEYS,
    STAGE_SECTIONS,
    STAGES,
    StaleStage,
    differing_key,
    fingerprint_parts,
    is_current,
    made_under,
    require_done,
    stage_dir,
    stage_fingerprint,
)


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
    "STAGES", "DONE", "Stage", "StaleStage", "fingerprint_parts", "is_current", "made_under", "open_stage", "require_done",
    "stage_dir", "stage_fingerprint",
]
