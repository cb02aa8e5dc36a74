"""A fake batch endpoint on 127.0.0.1: the OpenAI Batch API (file upload, batch create, poll, output
and error files) and Anthropic's Message Batches (create, poll, results), on top of FakeLLMServer, whose
`reply`/`logprobs` give each line its answer.

    with FakeBatchServer() as server:
        server.polls_until_done = 2            # in_progress for two looks, then it ends
        server.line_error = lambda custom_id, body: 500 if ... else None   # an errored line
        server.expire_after = 3                # only 3 lines run, then the batch expires
        server.poll_faults = 2                 # the next two looks at an OpenAI batch answer 503
        ...
        server.batches                         # every batch created: {"id", "api", "lines", "polls", ...}

`python -m tests.fake_batches [--polls N]` runs one in the foreground and prints its port.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import itertools
import json
import time
from typing import Callable

from tests.fake_servers import FakeLLMServer, serve_until_interrupted


class FakeBatchServer(FakeLLMServer):
    def __init__(self, polls_until_done: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.polls_until_done = polls_until_done
        self.line_error: Callable[[str, dict], int | None] | None = None
        self.expire_after: int | None = None  # when set: lines after the first N expire
        self.poll_faults = 0  # the next N looks at a batch answer 503
        self.batches: dict[str, dict] = {}
        self.files: dict[str, bytes] = {}
        self._ids = itertools.count(1)

    async def _respond(self, method: str, path: str, headers: dict, raw: bytes, writer) -> bool:
        route = path.split("?", 1)[0]
        if route == "/v1/files" and method == "POST":
            content = self._multipart_file(headers, raw)
            file_id = f"file-{next(self._ids)}"
            self.files[file_id] = content
            await self._send(writer, 200, self._file(file_id, len(content), "batch"))
            return True
        if route.startswith("/v1/files/") and route.endswith("/content"):
            data = self.files[route.split("/")[3]]
            await self._send_raw(writer, 200, data)
            return True
        if route == "/v1/batches" and method == "POST":
            body = json.loads(raw)
            lines = [json.loads(line) for line in self.files[body["input_file_id"]].decode().splitlines() if line]
            batch = self._new_batch("openai", [(line["custom_id"], line["body"]) for line in lines])
            batch["input_file_id"] = body["input_file_id"]
            await self._send(writer, 200, self._openai_batch(batch))
            return True
        if route.startswith("/v1/batches/") and method == "GET" and self.poll_faults:
            self.poll_faults -= 1
            await self._send(writer, 503, self._error("openai", 503))
            return True
        if route.startswith("/v1/batches/") and method == "GET":
            batch = self._look(route.split("/")[3])
            await self._send(writer, 200, self._openai_batch(batch))
            return True
        if route == "/v1/messages/batches" and method == "POST":
            body = json.loads(raw)
            batch = self._new_batch("anthropic", [(r["custom_id"], r["params"]) for r in body["requests"]])
            await self._send(writer, 200, self._anthropic_batch(batch))
            return True
        if route.startswith("/v1/messages/batches/") and route.endswith("/results"):
            batch = self.batches[route.split("/")[4]]
            data = "".join(json.dumps(line) + "\n" for line in self._anthropic_results(batch)).encode()
            await self._send_raw(writer, 200, data)
            return True
        if route.startswith("/v1/messages/batches/") and method == "GET":
            batch = self._look(route.split("/")[4])
            await self._send(writer, 200, self._anthropic_batch(batch))
            return True
        return await super()._respond(method, path, headers, raw, writer)

    # -- the batch's life ----------------------------------------------------------------------

    def _new_batch(self, api: str, lines: list[tuple[str, dict]]) -> dict:
        prefix = "batch_" if api == "openai" else "msgbatch_"
        batch = {"id": f"{prefix}{next(self._ids)}", "api": api, "lines": lines, "polls": 0,
                 "created": int(time.time()), "status": "in_progress", "outputs": None}
        self.batches[batch["id"]] = batch
        return batch

    def _look(self, batch_id: str) -> dict:
        """One poll: after `polls_until_done` of them the batch runs its lines and ends."""
        batch = self.batches[batch_id]
        batch["polls"] += 1
        if batch["outputs"] is None and batch["polls"] >= self.polls_until_done:
            outputs = []
            for n, (custom_id, body) in enumerate(batch["lines"]):
                if self.expire_after is not None and n >= self.expire_after:
                    outputs.append((custom_id, "expired", None))
                    continue
                status = self.line_error(custom_id, body) if self.line_error else None
                if status:
                    outputs.append((custom_id, status, self._error(batch["api"], status)))
                else:
                    outputs.append((custom_id, 200, self._answer(batch["api"], body)))
                    self.answered += 1
            batch["outputs"] = outputs
            batch["status"] = "expired" if self.expire_after is not None else "completed"
            if batch["api"] == "openai":
                ok = [o for o in outputs if o[1] == 200]
                bad = [o for o in outputs if o[1] != 200]
                batch["output_file_id"] = self._store_lines(self._openai_line(o) for o in ok) if ok else None
                batch["error_file_id"] = self._store_lines(self._openai_line(o) for o in bad) if bad else None
        return batch

    def _store_lines(self, lines) -> str:
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = "".join(json.dumps(line) + "\n" for line in lines).encode()
        return file_id

    @staticmethod
    def _openai_line(output) -> dict:
        custom_id, status, body = output
        if status == "expired":
            return {"id": f"req_{custom_id}", "custom_id": custom_id, "response": None,
                    "error": {"code": "batch_expired", "message": "This request could not be executed before the "
                              "completion window expired."}}
        return {"id": f"req_{custom_id}", "custom_id": custom_id,
                "response": {"status_code": status, "request_id": f"req_{custom_id}", "body": body}, "error": None}

    def _anthropic_results(self, batch: dict) -> list[dict]:
        out = []
        for custom_id, status, body in batch["outputs"]:
            if status == 200:
                result = {"type": "succeeded", "message": body}
            elif status == "expired":
                result = {"type": "expired"}
            else:
                result = {"type": "errored", "error": body}
            out.append({"custom_id": custom_id, "result": result})
        return out

    # -- wire shapes ---------------------------------------------------------------------------

    @staticmethod
    def _file(file_id: str, size: int, purpose: str) -> dict:
        return {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
                "filename": "batch.jsonl", "purpose": purpose, "status": "processed"}

    @staticmethod
    def _openai_batch(batch: dict) -> dict:
        done = batch["outputs"] is not None
        failed = sum(1 for o in batch["outputs"] or [] if o[1] != 200)
        return {"id": batch["id"], "object": "batch", "endpoint": "/v1/chat/completions", "errors": None,
                "input_file_id": batch.get("input_file_id"), "completion_window": "24h",
                "status": batch["status"], "output_file_id": batch.get("output_file_id"),
                "error_file_id": batch.get("error_file_id"), "created_at": batch["created"],
                "request_counts": {"total": len(batch["lines"]), "completed": len(batch["lines"]) - failed if done else 0,
                                   "failed": failed}}

    def _anthropic_batch(self, batch: dict) -> dict:
        ended = batch["outputs"] is not None
        return {"id": batch["id"], "type": "message_batch",
                "processing_status": "ended" if ended else "in_progress",
                "request_counts": {"processing": 0 if ended else len(batch["lines"]), "succeeded": 0, "errored": 0,
                                   "canceled": 0, "expired": 0},
                "ended_at": "2026-01-01T00:00:00Z" if ended else None, "created_at": "2026-01-01T00:00:00Z",
                "expires_at": "2026-01-02T00:00:00Z", "archived_at": None, "cancel_initiated_at": None,
                "results_url": f"{self.url}/v1/messages/batches/{batch['id']}/results" if ended else None}

    @staticmethod
    def _multipart_file(headers: dict, raw: bytes) -> bytes:
        head = f"Content-Type: {headers['content-type']}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
        for part in message.iter_parts():
            if part.get_filename():
                return part.get_payload(decode=True)
        raise ValueError("no file in the upload")


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a fake batch endpoint (OpenAI and Anthropic) on 127.0.0.1.")
    parser.add_argument("--polls", type=int, default=3, help="looks before a batch ends")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    serve_until_interrupted(lambda: FakeBatchServer(polls_until_done=args.polls, port=args.port))


if __name__ == "__main__":
    main()
