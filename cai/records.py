"""What stages leave on disk, written so that a crash or a kill at any point loses no finished work.

- JSONL records are appended one per finished item and flushed to disk (fsync) before the next one
  starts; a torn last line from a kill is dropped on read, so a rerun resumes after the last whole
  record.
- Everything else (configs, manifests, datasets, the done marker) is written to a temporary sibling
  and renamed into place, so a reader sees the old file or the new one, never half of one.
- Each stage folder holds the resolved config, a copy of the constitution with its hash, the package
  versions, and a `DONE` marker carrying the stage's fingerprint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from cai.errors import CaiError

DONE = "DONE"
FINGERPRINT = "fingerprint"


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux: /proc), so that
    no other thread ever creates a file under a umask of 0."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode any new file gets, so a team that shares an
        # output folder can read the reports and configs.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


class JsonlWriter:
    """Appends records to a JSONL file, one flushed and fsynced line per record."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict]:
    """All whole records of a JSONL file ([] if it does not exist).

    A last line without its newline is what a kill mid-write leaves: it is ignored and, with
    `repair=True`, cut off the file so that appending continues on a clean line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records = []
    good_end = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        stripped = line.strip()
        if stripped:
            try:
                records.append(json.loads(stripped))
            except json.JSONDecodeError as err:
                raise CaiError(f"{path}: line {len(records) + 1} is not valid JSON ({err.msg})") from None
        good_end += len(line)
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def numbered_jsonl(text: str, where: str) -> Iterator[tuple[int, str, Any]]:
    """(line number, line, parsed value) for each non-blank line of a JSONL text a user wrote. A line
    that is not JSON stops with `<where> line N: invalid JSON (...)`, `where` naming the file."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise CaiError(f"{where} line {number}: invalid JSON ({err.msg})") from None
        yield number, line, value


def save_dataset(dataset, path: str | Path) -> None:
    """`Dataset.save_to_disk` into a temporary folder, then swap it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in ("cai", "torch", "transformers", "trl", "datasets", "accelerate", "peft", "openai", "anthropic"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def ensure_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and prove it takes a file; one clear line if not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise CaiError(f"output folder {folder} is not writable: {err.strerror or err}") from None
    return folder


def is_done(stage_dir: Path, fingerprint: str) -> bool:
    marker = Path(stage_dir) / DONE
    return marker.exists() and marker.read_text().strip() == fingerprint


def mark_done(stage_dir: Path, fingerprint: str) -> None:
    atomic_write_text(Path(stage_dir) / DONE, fingerprint + "\n")


def record_usage(stage_dir: str | Path, client, role: str) -> dict:
    """Add this run's spending of `client` (a labeler, or the policy's server sampler) to
    `<stage>/<role>_usage.json`: one entry per run, each naming its client under `role`, and the total,
    so a stage resumed three times still shows what it cost altogether. The top-level `role` key names
    the latest run's client."""
    path = Path(stage_dir) / f"{role}_usage.json"
    previous = json.loads(path.read_text()) if path.exists() else {"runs": []}
    runs = previous["runs"] + [{role: client.id, **client.usage.as_dict()}]
    total: dict = {}
    for run in runs:
        for key, value in run.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
            elif isinstance(value, dict):  # e.g. server_requests: {url: n}
                sub = total.setdefault(key, {})
                for name, n in value.items():
                    sub[name] = sub.get(name, 0) + n
    data = {role: client.id, "total": total, "runs": runs}
    atomic_write_json(path, data)
    return data


def record_labeler_usage(stage_dir: str | Path, labeler) -> dict:
    """`<stage>/labeler_usage.json` (record_usage for the labeler)."""
    return record_usage(stage_dir, labeler, "labeler")
