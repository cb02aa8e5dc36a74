"""The persistent labeler cache: every answer a labeler gives is kept on disk, so that a stage killed
halfway repeats no request it already had an answer for, and a second identical run asks nothing.

`CachedLabeler(inner, path)` wraps any labeler (local or API) behind the same protocol. A request's
key is a SHA-256 over what determines its answer: the labeler's identity (backend, model, base URL,
system prompt and, for choices, the method), the messages, every sampling parameter, the options and
answer prefix of a choice, and the sample index. API keys are never part of it, nor of anything stored.

Storage is one SQLite file (standard library) in WAL mode: each answer is committed on its own the
moment it arrives, so a SIGKILL loses at most the answers still in flight and never corrupts the
file; other processes may read (and write) it at the same time. Failed requests are not cached (a
rerun retries them); unparseable answers are, with their raw text.

`cache_stats(path)` and `cache_clear(path, model=None)` back `cai cache stats|clear`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from cai.labelers.base import BudgetExceeded, Choice, ChoiceRequest, GenerateRequest, Generation, Labeler, Usage

CACHE_FILE = "labeler_cache.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key      TEXT PRIMARY KEY,
    kind     TEXT NOT NULL,      -- generate | choose
    labeler  TEXT NOT NULL,      -- the labeler's id, e.g. openai:gpt-4o-mini@https://api.openai.com/v1
    model    TEXT NOT NULL,
    status   TEXT NOT NULL,      -- ok | unparseable (failed answers are never stored)
    result   TEXT NOT NULL,      -- the Generation or Choice as JSON
    created  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_model ON answers(model);
"""


def default_cache_path(cfg) -> Path:
    """`<cache_dir>/labeler_cache.sqlite` for a whole cai Config."""
    return Path(cfg.cache_dir).expanduser() / CACHE_FILE


# -- the SQLite file ------------------------------------------------------------------------------

_connections: dict[tuple[str, int], tuple[sqlite3.Connection, threading.Lock]] = {}
_connections_lock = threading.Lock()


def _connect(path: Path) -> tuple[sqlite3.Connection, threading.Lock]:
    """The process's one connection to `path` (created with its folder and schema on first use)."""
    path = Path(path).expanduser().resolve()
    handle = (str(path), os.getpid())
    with _connections_lock:
        if handle not in _connections:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: autocommit, so each stored answer is its own durable transaction.
            conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: durable across process kills
            conn.execute("PRAGMA busy_timeout=30000")
            conn.executescript(_SCHEMA)
            _connections[handle] = (conn, threading.Lock())
        return _connections[handle]


def _close(path: Path) -> None:
    handle = (str(Path(path).expanduser().resolve()), os.getpid())
    with _connections_lock:
        entry = _connections.pop(handle, None)
    if entry:
        entry[0].close()


def cache_stats(path: str | Path) -> dict:
    """What the cache holds: {"path", "exists", "size_bytes", "entries", "unparseable",
    "by_model": {model: {"generate": n, "choose": n}}}. Does not create a missing file."""
    path = Path(path).expanduser()
    stats: dict[str, Any] = {"path": str(path), "exists": path.exists(), "size_bytes": 0, "entries": 0,
                             "unparseable": 0, "by_model": {}}
    if not path.exists():
        return stats
    stats["size_bytes"] = sum(
        p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()
    )
    conn, lock = _connect(path)
    with lock:
        rows = conn.execute("SELECT model, kind, status, COUNT(*) FROM answers GROUP BY model, kind, status").fetchall()
    for model, kind, status, count in rows:
        stats["entries"] += count
        if status == "unparseable":
            stats["unparseable"] += count
        per_model = stats["by_model"].setdefault(model, {"generate": 0, "choose": 0})
        per_model[kind] = per_model.get(kind, 0) + count
    return stats


def cache_clear(path: str | Path, model: str | None = None) -> int:
    """Delete every cached answer (or only those of `model`); returns how many were deleted."""
    path = Path(path).expanduser()
    if not path.exists():
        return 0
    conn, lock = _connect(path)
    with lock:
        if model is None:
            deleted = conn.execute("DELETE FROM answers").rowcount
        else:
            deleted = conn.execute("DELETE FROM answers WHERE model = ?", (model,)).rowcount
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if model is None:
            conn.execute("VACUUM")
    return deleted


# -- results <-> JSON -----------------------------------------------------------------------------

_FIELDS = {
    "generate": ("text", "status", "error", "input_tokens", "output_tokens"),
    "choose": ("probs", "method", "status", "raw", "error"),
}


def _encode(kind: str, result: Generation | Choice) -> str:
    return json.dumps({name: getattr(result, name) for name in _FIELDS[kind]}, ensure_ascii=False)


def _decode(kind: str, text: str) -> Generation | Choice:
    data = json.loads(text)
    cls = Generation if kind == "generate" else Choice
    return cls(**data, cached=True)


def request_key(kind: str, labeler_params: dict, request: GenerateRequest | ChoiceRequest, extra: dict) -> str:
    asked = dataclasses.asdict(request)
    asked.pop("subject", None)  # metadata restating the messages (base.ChoiceRequest)
    material = {"kind": kind, "labeler": labeler_params, "request": asked, "extra": extra}
    blob = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# -- the wrapper ----------------------------------------------------------------------------------


class CachedLabeler:
    """Any labeler, with its answers kept in (and served from) the on-disk cache.

    Misses go to the inner labeler in one batch. When the inner labeler's `generate`/`choose` take an
    `on_result(index, result)` callback (the API backends do), each answer is stored the moment it
    arrives; otherwise the batch is stored when it returns. `usage` is the inner labeler's, plus
    `cache_hits`.
    """

    def __init__(self, inner: Labeler, path: str | Path):
        self.inner = inner
        self.id = inner.id
        self.path = Path(path).expanduser()
        self._conn, self._lock = _connect(self.path)
        self._hits = 0
        self._hit_unparseable = 0
        model = getattr(inner, "model", None)  # API labelers name it; otherwise it is in the id
        self._model = model if isinstance(model, str) else inner.id.split(":", 1)[-1].split("@", 1)[0]

    def __getattr__(self, name: str):
        # Anything else (model, base_url, a local labeler's generator...) is the inner labeler's.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def usage(self) -> Usage:
        usage = dataclasses.replace(self.inner.usage, extra=dict(self.inner.usage.extra))
        usage.cache_hits += self._hits
        usage.unparseable += self._hit_unparseable
        return usage

    def _labeler_params(self, kind: str) -> dict:
        params = getattr(self.inner, "cache_params", None)
        return params(kind) if callable(params) else {"id": self.inner.id}

    def generate(self, requests: list[GenerateRequest], desc: str | None = None, **kwargs) -> list[Generation]:
        return self._run("generate", requests, desc, kwargs)

    def choose(self, requests: list[ChoiceRequest], desc: str | None = None, **kwargs) -> list[Choice]:
        return self._run("choose", requests, desc, kwargs)

    def close(self) -> None:
        self.inner.close()

    def _lookup(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                marks = ",".join("?" * len(chunk))
                found.update(self._conn.execute(f"SELECT key, result FROM answers WHERE key IN ({marks})", chunk))
        return found

    def _store(self, kind: str, key: str, result: Generation | Choice) -> None:
        if result.status == "failed":
            return
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO answers (key, kind, labeler, model, status, result, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, kind, self.id, self._model, result.status, _encode(kind, result), time.time()),
            )

    def _run(self, kind: str, requests: list, desc: str | None, kwargs: dict) -> list:
        # Options that change the answer (e.g. reject_refusals=True) are part of the key.
        extra = {k: v for k, v in kwargs.items() if v}
        params = self._labeler_params(kind)
        keys = [request_key(kind, params, request, extra) for request in requests]
        found = self._lookup(keys)
        results: list = [None] * len(requests)
        pending: dict[str, list[int]] = {}  # key -> positions (identical requests are asked once)
        for i, key in enumerate(keys):
            if key in found:
                results[i] = _decode(kind, found[key])
                self._hits += 1
                self._hit_unparseable += results[i].status == "unparseable"
            else:
                pending.setdefault(key, []).append(i)
        if not pending:
            return results

        miss_keys = list(pending)
        batch = [requests[pending[key][0]] for key in miss_keys]

        def on_result(j: int, result) -> None:
            self._store(kind, miss_keys[j], result)
            for i in pending[miss_keys[j]]:
                results[i] = result

        method = getattr(self.inner, kind)
        accepted = inspect.signature(method).parameters
        call_kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        if "on_result" in accepted:
            call_kwargs["on_result"] = on_result
        try:
            answers = method(batch, desc=desc, **call_kwargs)
        except BudgetExceeded as err:
            err.results = results  # everything received so far, None where nothing came
            raise
        for j, answer in enumerate(answers):
            if results[pending[miss_keys[j]][0]] is None:  # not streamed through on_result
                on_result(j, answer)
        return results
