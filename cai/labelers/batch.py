"""The providers' batch APIs (`labeler.batch_api: true`): OpenAI's Batch API and Anthropic's Message
Batches, at their lower price, for stages where latency does not matter.

The engine (api_common.py) runs exactly as it does online: parse retries, votes, budgets. Only the
transport changes: `BatchTransport` stands in for the SDK client, and its `post(path, body=...)`,
instead of sending the request, queues it and waits. When no new request has come for a moment
(every item is waiting for an answer), the queue goes out as one batch:

1. OpenAI: the requests as JSONL, uploaded (`POST /files`, purpose "batch"), then `POST /batches`;
   Anthropic: `POST /v1/messages/batches` with the requests inline.
2. The batch id is written to `labeler_batches.json` in the stage folder the moment it exists.
3. The batch is polled every `labeler.batch_poll_seconds` until it ends.
4. Its results are saved beside it (`labeler_batches/<id>.jsonl`, one line per request, the same
   shape for both providers) and handed to the waiting requests: an answer goes on as if it had come
   online (and reaches the answer cache); an errored line raises the error with its HTTP status, so
   the engine retries it (5xx, 429, or a request the batch expired or cancelled before running) in the
   next batch, fails that item (400), or stops the stage (401/403/404), as online.

A request is named by a hash of its body and how many identical bodies came before it in this
process (votes repeat a body), so a rerun names its requests as the killed run did. A request already
in a batch of the state file (running, or answered) waits for that batch instead of being submitted
again: a stage killed while its batch runs picks it up, and submits nothing twice. A request whose
earlier batch line failed is submitted anew.

Budgets count the batch price (`labeler.batch_discount` times `labeler.prices`).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import time
from pathlib import Path

from cai.records import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

STATE_FILE = "labeler_batches.json"
RESULTS_DIR = "labeler_batches"
OPEN_STATUSES = {"validating", "in_progress", "finalizing", "cancelling", "canceling"}
GATHER_SECONDS = 0.2  # no new request for this long: every item waits, the batch goes out
MAX_REQUESTS = {"openai": 50_000, "anthropic": 100_000}  # per batch, the providers' limits
MAX_BYTES = {"openai": 190_000_000, "anthropic": 240_000_000}  # under their 200 MB / 256 MB per batch

# The folder of the stage being run (set by cai.stages.open_stage): where batch ids are written.
stage_folder: contextvars.ContextVar[Path | None] = contextvars.ContextVar("cai_stage_folder", default=None)


class BatchItemError(Exception):
    """A batch line that holds no answer; `status_code` as the online request would have had it."""

    def __init__(self, message: str, status_code: int | None):
        super().__init__(message)
        self.status_code = status_code


def load_state(folder: Path) -> dict:
    path = Path(folder) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {"batches": []}


def open_batches(output_dir: str | Path) -> list[dict]:
    """Every batch not known to have ended, in every stage folder of a run: `cai batches`."""
    found = []
    for path in sorted(Path(output_dir).expanduser().glob(f"*/{STATE_FILE}")):
        for entry in load_state(path.parent)["batches"]:
            found.append({"stage": path.parent.name, **{k: v for k, v in entry.items() if k != "custom_ids"},
                          "requests": len(entry["custom_ids"]), "open": entry["status"] in OPEN_STATUSES})
    return found


class _Batch:
    def __init__(self, entry: dict):
        self.entry = entry
        self.ids = set(entry["custom_ids"])
        self.waiters: dict[str, list[asyncio.Future]] = {}
        self.results: dict[str, dict] | None = None
        self.poller: asyncio.Task | None = None


class BatchTransport:
    """The SDK client's stand-in for the engine in batch mode (see the module's docstring)."""

    def __init__(self, client, backend: str, folder: Path, poll_seconds: float, usage):
        self.client = client
        self.backend = backend
        self.folder = Path(folder)
        self.poll_seconds = poll_seconds
        self.usage = usage
        self.state = load_state(self.folder)
        self.batches = {entry["id"]: _Batch(entry) for entry in self.state["batches"]}
        self.seen: dict[str, int] = {}  # body hash -> identical bodies posted so far
        self.queue: list[tuple[str, str, dict, asyncio.Future]] = []
        self.flusher: asyncio.Task | None = None
        self.last_post = 0.0

    # -- what the engine calls -----------------------------------------------------------------

    async def post(self, path: str, *, body: dict, cast_to=object, **_):
        digest = hashlib.sha256(json.dumps([path, body], sort_keys=True).encode()).hexdigest()[:40]
        n = self.seen.get(digest, 0)
        self.seen[digest] = n + 1
        custom_id = f"r{digest}-{n}"
        future = asyncio.get_running_loop().create_future()
        batch = self._known(custom_id)
        if batch is not None:
            batch.waiters.setdefault(custom_id, []).append(future)
            self._deliver(batch)
            if batch.results is None and batch.poller is None:  # a batch of an earlier run: poll it
                print(f"[batch] {batch.entry['id']} was submitted by an earlier run "
                      f"({len(batch.ids)} requests, last seen {batch.entry['status']}): waiting for it", flush=True)
                batch.poller = asyncio.ensure_future(self._poll(batch))
        else:
            self.queue.append((custom_id, path, body, future))
            self.last_post = time.monotonic()
            if self.flusher is None or self.flusher.done():
                self.flusher = asyncio.ensure_future(self._flush())
        return await future

    async def close(self) -> None:
        for task in [self.flusher] + [b.poller for b in self.batches.values()]:
            if task is not None and not task.done():
                task.cancel()
        await self.client.close()

    # -- bookkeeping ---------------------------------------------------------------------------

    def _known(self, custom_id: str) -> _Batch | None:
        """The batch that holds (or will hold) an answer for `custom_id`; None to submit it anew."""
        for batch in self.batches.values():
            if custom_id not in batch.ids:
                continue
            if batch.results is None:
                batch.results = self._saved_results(batch)
            if batch.results is None:  # still running, or ended before its results were saved
                return batch
            if batch.results.get(custom_id, {}).get("status_code") == 200:
                return batch
        return None  # never submitted, or its line failed: submitted (again)

    def _saved_results(self, batch: _Batch) -> dict | None:
        path = self.folder / RESULTS_DIR / f"{batch.entry['id']}.jsonl"
        if not path.exists():
            return None
        return {line["custom_id"]: line for line in map(json.loads, path.read_text().splitlines()) if line}

    def _save_state(self) -> None:
        self.state["batches"] = [b.entry for b in self.batches.values()]
        atomic_write_json(self.folder / STATE_FILE, self.state)

    def _deliver(self, batch: _Batch) -> None:
        """Hand the results (if in) to every request waiting on `batch`, in a fixed order."""
        if batch.results is None:
            return
        for custom_id in sorted(batch.waiters):
            line = batch.results.get(custom_id) or {"status_code": None, "error": "no result for the request"}
            for future in batch.waiters.pop(custom_id):
                if future.done():
                    continue
                if line.get("status_code") == 200:
                    future.set_result(line["body"])
                else:
                    future.set_exception(BatchItemError(f"batch {batch.entry['id']}: {line.get('error')}",
                                                        line.get("status_code")))

    # -- the life cycle ------------------------------------------------------------------------

    async def _flush(self) -> None:
        # Wait until no new request has come for GATHER_SECONDS (or a batch is full).
        while self.queue:
            idle = time.monotonic() - self.last_post
            if idle < GATHER_SECONDS and len(self.queue) < MAX_REQUESTS[self.backend]:
                await asyncio.sleep(GATHER_SECONDS - idle)
                continue
            count, size = 0, 0
            for _, _, body, _ in self.queue[: MAX_REQUESTS[self.backend]]:
                size += len(json.dumps(body)) + 200  # the line's own fields
                if count and size > MAX_BYTES[self.backend]:
                    break
                count += 1
            items, self.queue = self.queue[:count], self.queue[count:]
            try:
                batch = await self._submit(items)
            except Exception as exc:  # noqa: BLE001 - the requests fail (and are retried) like online ones
                for *_, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for custom_id, _, _, future in items:
                batch.waiters.setdefault(custom_id, []).append(future)
            batch.poller = asyncio.ensure_future(self._poll(batch))

    async def _submit(self, items) -> _Batch:
        if self.backend == "openai":
            lines = "".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1" + path, "body": body}) + "\n"
                            for cid, path, body, _ in items)
            uploaded = await self.client.files.create(file=("batch.jsonl", lines.encode(), "application/jsonl"),
                                                      purpose="batch")
            created = await self.client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                       completion_window="24h")
            status = created.status
        else:
            created = await self.client.messages.batches.create(
                requests=[{"custom_id": cid, "params": body} for cid, _, body, _ in items])
            status = created.processing_status
        entry = {"id": created.id, "backend": self.backend, "status": status, "created": time.time(),
                 "custom_ids": [cid for cid, *_ in items]}
        batch = self.batches[created.id] = _Batch(entry)
        self._save_state()  # the id is on disk before anything else happens
        self.usage.extra["batches"] = self.usage.extra.get("batches", 0) + 1
        print(f"[batch] submitted {created.id}: {len(items)} requests ({self.backend}); "
              f"its id is in {self.folder / STATE_FILE}", flush=True)
        return batch

    async def _poll(self, batch: _Batch) -> None:
        """Look at the batch until it ends, then fetch its results. A failed look (the network, a 5xx) is
        tried again at the next one: the batch keeps running, and resubmitting it would pay twice. A
        rejected key or an unknown batch (401/403/404) is handed to the waiting requests, which stop
        the stage with one line as online."""
        batch_id = batch.entry["id"]
        while True:
            try:
                ended, info = await self._look(batch)
                if ended:
                    results = await (self._openai_results(info) if self.backend == "openai"
                                     else self._anthropic_results(batch_id))
                    break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified just below
                status = getattr(exc, "status_code", None)
                if status in (401, 403, 404):
                    results = {cid: {"status_code": status, "error": f"{type(exc).__name__}: {exc}"[:300]}
                               for cid in batch.ids}
                    break
                log.warning("batch %s: looking at it failed (%s); trying again in %g s",
                            batch_id, f"{type(exc).__name__}: {exc}"[:200], self.poll_seconds)
            await asyncio.sleep(self.poll_seconds)
        lines = "".join(json.dumps({"custom_id": cid, **line}) + "\n" for cid, line in results.items())
        atomic_write_text(self.folder / RESULTS_DIR / f"{batch_id}.jsonl", lines)
        batch.results = results
        self._deliver(batch)

    async def _look(self, batch: _Batch):
        """(whether the batch has ended, what the provider said about it); its status saved when it changed."""
        if self.backend == "openai":
            info = await self.client.batches.retrieve(batch.entry["id"])
            status = info.status
            ended = status in ("completed", "expired", "cancelled", "failed")
        else:
            info = await self.client.messages.batches.retrieve(batch.entry["id"])
            status = info.processing_status
            ended = status == "ended"
        if status != batch.entry["status"]:
            batch.entry["status"] = status
            self._save_state()
            print(f"[batch] {batch.entry['id']}: {status}", flush=True)
        return ended, info

    async def _openai_results(self, info) -> dict[str, dict]:
        results: dict[str, dict] = {}
        for file_id in (info.error_file_id, info.output_file_id):  # answers override errors
            if not file_id:
                continue
            content = await self.client.files.content(file_id)
            for raw in content.text.splitlines():
                if not raw.strip():
                    continue
                line = json.loads(raw)
                response = line.get("response") or {}
                error = line.get("error")
                code = response.get("status_code")
                if error or code != 200:
                    message = (error or {}).get("message") or json.dumps(response.get("body"))[:300]
                    results[line["custom_id"]] = {"status_code": code if code and code != 200 else None,
                                                  "error": f"{(error or {}).get('code') or code}: {message}"}
                else:
                    results[line["custom_id"]] = {"status_code": 200, "body": response["body"]}
        if info.status != "completed":
            why = f"the batch {info.status} before this request ran"
            for custom_id in self.batches[info.id].entry["custom_ids"]:
                results.setdefault(custom_id, {"status_code": None, "error": why})
        return results

    async def _anthropic_results(self, batch_id: str) -> dict[str, dict]:
        results: dict[str, dict] = {}
        async for item in await self.client.messages.batches.results(batch_id):
            line = item.to_dict() if hasattr(item, "to_dict") else dict(item)
            result = line.get("result") or {}
            kind = result.get("type")
            if kind == "succeeded":
                results[line["custom_id"]] = {"status_code": 200, "body": result["message"]}
            elif kind == "errored":
                error = (result.get("error") or {}).get("error") or {}
                status = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                          "not_found_error": 404, "rate_limit_error": 429}.get(error.get("type"), 500)
                results[line["custom_id"]] = {"status_code": status,
                                              "error": f"{error.get('type')}: {error.get('message')}"}
            else:  # canceled, expired: never ran; retried in the next batch
                results[line["custom_id"]] = {"status_code": None, "error": f"the request was {kind}"}
        for custom_id in self.batches[batch_id].entry["custom_ids"]:
            results.setdefault(custom_id, {"status_code": None, "error": "no result for the request"})
        return results
