"""A fake LLM server on 127.0.0.1 that speaks the OpenAI Chat Completions and Anthropic Messages wire
formats, for tests and benchmarks. No network, no extra dependency: a small HTTP/1.1 handler on
`asyncio.start_server`, so hundreds of slow requests in flight cost it almost nothing.

    with FakeLLMServer(latency=0.05) as server:
        client = openai.OpenAI(base_url=server.openai_url, api_key="x")      # POST /v1/chat/completions
        client = anthropic.Anthropic(base_url=server.anthropic_url, api_key="x")  # POST /v1/messages
        ...
        server.requests        # every request received: {"path", "headers", "body"}

What it answers is set by attributes, which a test may change at any time:

- `reply(api, body) -> str`: the answer text (default: "Answer to: <last user message>").
- `logprobs(body) -> list[dict[str, float]] | None`: token distributions, one per generated position
  (token -> log-probability). When set and the request asks for `logprobs`, the OpenAI route answers
  the most likely token at each position, with `top_logprobs`. None (the default) answers
  `"logprobs": null`, like a server that has none.
- `model`: a `ScriptedModel` that writes its answer token by token, as a served model does: the
  chat route renders the messages in ChatML and the model continues the prompt, with log-probabilities
  at every position (when `chat_logprobs`). How the server treats a prefilled final assistant message
  is set by `continue_final_message`: "honour" (vLLM: the answer continues it when the body says
  `continue_final_message: true, add_generation_prompt: false`), "ignore" (llama-cpp-python: the
  fields are dropped and a new answer starts), "reject" (a strict server: 400 for an unknown field).
  `completions=True` adds the raw `/v1/completions` route (legacy `logprobs`: the top alternatives per
  position as a dict) and `apply_template=True` llama.cpp's `POST /apply-template` (the ChatML prompt).
- faults, consumed one per request: `server.plan("429", "500", ...)` queues them in order, and
  `fault_for(api, body) -> str | None` picks one for a given request. A fault is one of
  "429" (rate limited, with `Retry-After: <retry_after>`), "500", "503", "400", "401",
  "slow" (answers after `slow_seconds`), "malformed" (a 200 whose body is not JSON),
  "drop" (headers and half the body, then the connection is closed), "close" (closed at once),
  "echo-auth" (a 400 whose message quotes the request's credentials, for key-leak tests).

`python -m tests.fake_servers --latency 0.2` runs one in the foreground and prints its port, for
benchmarks that want the server in another process; `GET /stats` then reports its counts.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import threading
from typing import Callable

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 429: "Too Many Requests",
           500: "Internal Server Error", 503: "Service Unavailable", 404: "Not Found"}


def last_user_text(body: dict) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content", "")
            if isinstance(content, list):  # Anthropic content blocks
                content = "".join(block.get("text", "") for block in content if isinstance(block, dict))
            return content
    return ""


def default_reply(api: str, body: dict) -> str:
    return "Answer to: " + last_user_text(body)


def chatml(messages: list[dict], add_generation_prompt: bool = True, continue_final: bool = False) -> str:
    """The conversation as SmolLM2's (ChatML) template writes it; `continue_final` leaves the last
    assistant message open, so that the answer continues it."""
    text = ""
    for i, message in enumerate(messages):
        open_end = continue_final and i == len(messages) - 1 and message["role"] == "assistant"
        text += f"<|im_start|>{message['role']}\n{message['content']}" + ("" if open_end else "<|im_end|>\n")
    if add_generation_prompt and not continue_final:
        text += "<|im_start|>assistant\n"
    return text


class ScriptedModel:
    """A stand-in for a served model: it always writes the same answer, split into `tokens` as its
    tokenizer would, continuing from wherever the prompt leaves off (a prompt that already ends with the
    answer's first tokens, a prefill, gets the rest; any other prompt gets the whole answer).

    `dists` gives the distribution at chosen positions of the answer (token -> log-probability); the
    other positions write their token at -0.05, with a few unlikely alternatives, an option letter
    among them, as real models show."""

    def __init__(self, tokens: list[str], dists: dict[int, dict[str, float]] | None = None):
        self.tokens = list(tokens)
        self.dists = dists or {}

    def _start(self, prompt: str) -> int:
        for k in range(len(self.tokens), 0, -1):
            if prompt.endswith("".join(self.tokens[:k])):
                return k
        return 0

    def positions(self, prompt: str, max_tokens: int) -> list[dict[str, float]]:
        """The distribution at each position the answer to `prompt` writes, at most `max_tokens`."""
        start = self._start(prompt)
        out = []
        for i in range(start, min(len(self.tokens), start + max_tokens)):
            dist = self.dists.get(i) or {self.tokens[i]: -0.05, " Both": -4.0, "You": -5.0, "A": -6.5}
            out.append(dist)
        return out

    def written(self, positions: list[dict[str, float]]) -> list[str]:
        return [max(dist, key=dist.get) for dist in positions]


class FakeLLMServer:
    def __init__(
        self,
        latency: float = 0.0,
        reply: Callable[[str, dict], str] = default_reply,
        logprobs: Callable[[dict], list[dict[str, float]] | None] | None = None,
        retry_after: str | None = "0",
        slow_seconds: float = 5.0,
        port: int = 0,
        model: ScriptedModel | None = None,
        continue_final_message: str = "ignore",
        completions: bool = False,
        apply_template: bool = False,
        chat_logprobs: bool = True,
        max_concurrency: int | None = None,
    ):
        self.model = model
        self.continue_final_message = continue_final_message
        self.completions = completions
        self.apply_template = apply_template
        self.chat_logprobs = chat_logprobs
        self.latency = latency
        self.reply = reply
        self.logprobs = logprobs
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.fault_for: Callable[[str, dict], str | None] | None = None
        self.served_models: list[str] = ["fake-model"]  # what GET /v1/models lists (not counted as a request)
        self.requests: list[dict] = []
        self.answered = 0  # requests answered with a 200 and a full, valid body
        self.max_in_flight = 0
        self._in_flight = 0
        # like a server with a fixed number of slots: requests beyond them queue (for pool benchmarks)
        self.max_concurrency = max_concurrency
        self._slots: asyncio.Semaphore | None = None
        self._faults: collections.deque[str] = collections.deque()
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    # -- control -----------------------------------------------------------------------------

    def plan(self, *faults: str) -> None:
        """Queue faults for the next requests, in order (one per request)."""
        self._faults.extend(faults)

    def reset(self) -> None:
        self.requests.clear()
        self._faults.clear()
        self.answered = 0
        self.max_in_flight = 0
        self.fault_for = None

    def bodies(self, path_suffix: str = "") -> list[dict]:
        return [r["body"] for r in self.requests if r["path"].endswith(path_suffix)]

    @property
    def port(self) -> int:
        return self._port  # the bound port, still known after stop() (a killed server keeps its URL)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    @property
    def anthropic_url(self) -> str:
        return self.url

    async def start_async(self) -> None:
        if self.max_concurrency:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self._port, backlog=1024)
        self._port = self._server.sockets[0].getsockname()[1]

    def start(self) -> "FakeLLMServer":
        """Serve from a background thread with its own event loop."""
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self.start_async())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="fake-llm-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> "FakeLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP ----------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line.strip():
                    break
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers = {}
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", 0))
                raw = await reader.readexactly(length) if length else b""
                keep_alive = await self._respond(method, path, headers, raw, writer)
                if not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _respond(self, method: str, path: str, headers: dict, raw: bytes, writer) -> bool:
        if path == "/stats":  # for a server in another process; not counted as a request
            await self._send(writer, 200, {"requests": len(self.requests), "answered": self.answered,
                                           "max_in_flight": self.max_in_flight})
            return True
        if method == "GET" and path.endswith("/models"):
            await self._send(writer, 200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "fake"} for name in self.served_models]})
            return True
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        self.requests.append({"path": path, "headers": headers, "body": body})
        if path.endswith("/chat/completions"):
            api = "openai"
        elif path.endswith("/messages"):
            api = "anthropic"
        elif path.endswith("/v1/completions") and self.completions:
            api = "completions"
        elif path == "/apply-template" and self.apply_template:
            await self._send(writer, 200, {"prompt": chatml(body.get("messages", []))})
            return True
        else:
            await self._send(writer, 404, {"error": {"message": f"no route {path}"}})
            return True
        fault = self._faults.popleft() if self._faults else None
        if fault is None and self.fault_for is not None:
            fault = self.fault_for(api, body)

        if self._slots is not None:
            await self._slots.acquire()
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            if fault is None and api == "openai" and self.model is not None and "continue_final_message" in body \
                    and self.continue_final_message == "reject":
                await self._send(writer, 400, {"error": {"message": "Unrecognized request argument supplied: "
                                                         "continue_final_message", "type": "invalid_request_error"}})
                return True
            if fault is None:
                await self._send(writer, 200, self._answer(api, body))
                self.answered += 1
                return True
            return await self._fault(fault, api, headers, writer)
        finally:
            self._in_flight -= 1
            if self._slots is not None:
                self._slots.release()

    async def _fault(self, fault: str, api: str, headers: dict, writer) -> bool:
        if fault == "slow":
            await asyncio.sleep(self.slow_seconds)
            await self._send(writer, 200, {"note": "too late"})
            return True
        if fault in ("429", "500", "503", "400", "401"):
            status = int(fault)
            extra = {"Retry-After": self.retry_after} if status == 429 and self.retry_after is not None else {}
            await self._send(writer, status, self._error(api, status), extra)
            return True
        if fault == "echo-auth":  # a careless proxy that quotes the request's credentials back
            credentials = headers.get("authorization", "") + " " + headers.get("x-api-key", "")
            error = self._error(api, 400)
            (error.get("error") or error)["message"] = f"bad request from {credentials.strip()}"
            await self._send(writer, 400, error)
            return True
        if fault == "malformed":
            await self._send_raw(writer, 200, b'{"id": "broken", "choices": [{"index": 0, "mess')
            return True
        if fault == "drop":
            payload = b'{"id": "dropped", "choices": [], "content": []}' * 4
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n").encode()
            writer.write(head + payload[: len(payload) // 2])
            await writer.drain()
            writer.transport.abort()
            return False
        if fault == "close":
            writer.transport.abort()
            return False
        raise ValueError(f"unknown fault {fault!r}")

    @staticmethod
    def _error(api: str, status: int) -> dict:
        kind = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}.get(
            status, "api_error")
        if api == "anthropic":
            return {"type": "error", "error": {"type": kind, "message": f"fake {status}"}}
        return {"error": {"message": f"fake {status}", "type": kind, "param": None, "code": None}}

    async def _send(self, writer, status: int, payload: dict, extra_headers: dict | None = None) -> None:
        await self._send_raw(writer, status, json.dumps(payload).encode(), extra_headers)

    @staticmethod
    async def _send_raw(writer, status: int, data: bytes, extra_headers: dict | None = None) -> None:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", "Content-Type: application/json",
                 f"Content-Length: {len(data)}"]
        lines += [f"{k}: {v}" for k, v in (extra_headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        await writer.drain()

    # -- answers -------------------------------------------------------------------------------

    def _model_answer(self, api: str, body: dict) -> dict:
        """The scripted model's answer on the chat or the completions route."""
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        if api == "completions":
            prompt = body.get("prompt", "")
        else:
            honour = self.continue_final_message == "honour"
            prompt = chatml(body.get("messages", []),
                            add_generation_prompt=body.get("add_generation_prompt", True) if honour else True,
                            continue_final=bool(body.get("continue_final_message")) if honour else False)
        positions = self.model.positions(prompt, max_tokens)
        tokens = self.model.written(positions)
        text = "".join(tokens)
        usage = {"prompt_tokens": max(1, len(prompt) // 4), "completion_tokens": len(tokens),
                 "total_tokens": max(1, len(prompt) // 4) + len(tokens)}
        top_n = int(body.get("top_logprobs") or 0)
        ranked = [sorted(dist.items(), key=lambda kv: -kv[1]) for dist in positions]
        if api == "completions":
            n = int(body.get("logprobs") or 0)
            logprobs = {"tokens": tokens, "token_logprobs": [d[t] for d, t in zip(positions, tokens)],
                        "top_logprobs": [dict(r[:n]) for r in ranked],
                        "text_offset": [len(prompt) + len("".join(tokens[:i])) for i in range(len(tokens))]} if n else None
            return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": body.get("model"),
                    "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": "length"}],
                    "usage": usage}
        logprobs = None
        if body.get("logprobs") and self.chat_logprobs:
            logprobs = {"content": [
                {"token": t, "logprob": d[t], "bytes": None,
                 "top_logprobs": [{"token": a, "logprob": lp, "bytes": None} for a, lp in r[:top_n]]}
                for t, d, r in zip(tokens, positions, ranked)], "refusal": None}
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": logprobs, "finish_reason": "length"}],
                "usage": usage}

    def _answer(self, api: str, body: dict) -> dict:
        if self.model is not None and api in ("openai", "completions"):
            return self._model_answer(api, body)
        positions = self.logprobs(body) if self.logprobs is not None else None
        if api == "openai" and positions is not None and body.get("logprobs"):
            tokens = [max(dist, key=dist.get) for dist in positions]
            text = "".join(tokens)
            top_n = int(body.get("top_logprobs") or 0)
            logprobs = {"content": [
                {"token": token, "logprob": dist[token], "bytes": None,
                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": None}
                                  for t, lp in sorted(dist.items(), key=lambda kv: -kv[1])[:top_n]]}
                for token, dist in zip(tokens, positions)
            ], "refusal": None}
        else:
            text = self.reply(api, body)
            logprobs = None
        input_tokens = max(1, math.ceil(len(json.dumps(body.get("messages", []))) / 4))
        output_tokens = max(1, math.ceil(len(text) / 4))
        model = body.get("model", "fake")
        if api == "anthropic":
            return {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                             "logprobs": logprobs, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens,
                          "total_tokens": input_tokens + output_tokens}}


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a fake OpenAI/Anthropic server on 127.0.0.1.")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds before each answer")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=None, help="requests served at once (more queue)")
    args = parser.parse_args()

    serve_until_interrupted(lambda: FakeLLMServer(latency=args.latency, port=args.port, max_concurrency=args.concurrency))


def serve_until_interrupted(make_server) -> None:
    """Start the server `make_server()` builds, print its port (the parent process reads it), serve until Ctrl-C."""

    async def serve() -> None:
        server = make_server()
        await server.start_async()
        print(server.port, flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
