"""The OpenAI Chat Completions labeler: the OpenAI API, or any OpenAI-compatible server (vLLM,
llama.cpp's server, Ollama, TGI...) through `labeler.base_url`.

Choices come from `logprobs`/`top_logprobs` where the server returns them (OpenAI, vLLM and
llama.cpp's server do), else from votes; the engine is in api_common.py. Chat Completions has no
assistant prefill of its own, but compatible servers offer two ways to put the answer prefix
("The answer is: (") in place, tried once per labeler (`prefill_ways`), so that the next token is the label:

- `chat-continue`: vLLM's chat API continues a final assistant message when the body says
  `continue_final_message: true, add_generation_prompt: false` (servers that ignore the fields start a
  new answer instead, which the engine notices);
- `completions`: the raw `/completions` endpoint (vLLM, llama.cpp, Ollama) given the conversation in the
  model's chat template plus the prefix. The template is the server's own where it offers it
  (llama.cpp's server: `POST /apply-template`), else that of a local copy of the model's tokenizer
  (`labeler.model` an alias, folder or Hugging Face id that cai can load).

Requests go through the `openai` client's own `post` (its documented way to send a request it does
not model) with the body as plain JSON: the client still builds the request, authenticates and raises
its typed errors, but skips validating and rebuilding every body, which otherwise costs about as much
CPU as the HTTP itself when hundreds of requests are in flight.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from cai.labelers.api_common import ApiLabeler, Reply, aiohttp_transport

log = logging.getLogger(__name__)

_UNSET = object()


class OpenAILabeler(ApiLabeler):
    backend = "openai"
    default_key_env = "OPENAI_API_KEY"
    hosted_hosts = {"api.openai.com"}
    supports_logprobs = True
    supports_prefill = False  # votes are asked with an instruction; log-probabilities may be prefilled
    prefill_ways = ("chat-continue", "completions")

    def __init__(self, model: str, **kwargs):
        base_url = kwargs.get("base_url")
        urls = base_url if isinstance(base_url, (list, tuple)) else [base_url]  # a list is a pool of servers
        if any(url is None or urlsplit(url).hostname in self.hosted_hosts for url in urls):
            self.prefill_ways = ()  # the hosted API has neither way for its chat models
        super().__init__(model, **kwargs)
        self._template = _UNSET  # "server", a tokenizer with a chat template, or None

    def _client(self):
        import openai

        return openai.AsyncOpenAI(api_key=self._api_key, base_url=self.base_url, max_retries=0,
                                  timeout=self.timeout, http_client=aiohttp_transport(openai))

    @property
    def _max_tokens_field(self) -> str:
        # The hosted API's newer models take only max_completion_tokens; compatible servers all know
        # max_tokens, not all the newer name.
        hosted = self.base_url is None or "api.openai.com" in self.base_url
        return "max_completion_tokens" if hosted else "max_tokens"

    @property
    def _server_root(self) -> str:
        """The server's address without the trailing /v1, where llama.cpp keeps its own routes."""
        root = self.base_url or ""
        return root[: -len("/v1")] if root.endswith("/v1") else root

    async def _can_prefill(self, client, way: str) -> bool:
        if way != "completions":
            return True
        if self._template is _UNSET:
            self._template = await self._find_template(client)
        return self._template is not None

    async def _find_template(self, client):
        try:
            data = await client.post(self._server_root + "/apply-template",
                                     body={"messages": [{"role": "user", "content": "x"}]}, cast_to=object)
            if isinstance(data, dict) and isinstance(data.get("prompt"), str):
                return "server"
        except Exception as err:  # noqa: BLE001 - most servers have no such route
            log.debug("labeler %s: no /apply-template (%s)", self.id, err)
        try:
            from transformers import AutoTokenizer

            from cai.models import resolve_model

            tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.model, self.cache_dir or "~/.cache/cai"))
            if tokenizer.chat_template:
                return tokenizer
        except Exception as err:  # noqa: BLE001 - a served name need not be a model cai can load
            log.debug("labeler %s: no local tokenizer for %r (%s)", self.id, self.model, err)
        return None

    async def _prompt_text(self, client, messages: list[dict]) -> str:
        """The conversation in the model's chat template, ready for the assistant's answer."""
        if self._template == "server":
            data = await client.post(self._server_root + "/apply-template", body={"messages": messages}, cast_to=object)
            return data["prompt"]
        return self._template.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    async def _send(self, client, messages, *, max_tokens, temperature, top_p, top_logprobs=None, prefill=None,
                    prefill_way=None) -> Reply:
        if prefill and prefill_way == "completions":
            return await self._send_completion(client, messages, prefill, max_tokens=max_tokens,
                                               temperature=temperature, top_p=top_p, top_logprobs=top_logprobs)
        body = {"model": self.model, "messages": messages, "temperature": temperature, "top_p": top_p,
                self._max_tokens_field: max_tokens}
        if prefill and prefill_way == "chat-continue":
            body["messages"] = [*messages, {"role": "assistant", "content": prefill}]
            body.update(continue_final_message=True, add_generation_prompt=False)
        if top_logprobs:
            body.update(logprobs=True, top_logprobs=top_logprobs)
        data = await client.post("/chat/completions", body=body, cast_to=object)
        choice = data["choices"][0]  # a body without it is malformed: retried like one
        message = choice["message"]
        text = message.get("content") or ""
        logprobs = None
        content = (choice.get("logprobs") or {}).get("content") if top_logprobs else None
        if content:
            logprobs = [(t["token"], [(alt["token"], alt["logprob"]) for alt in t.get("top_logprobs") or []])
                        for t in content]
        return Reply(text, *self._usage_of(data, messages, text), refusal=bool(message.get("refusal")),
                     logprobs=logprobs)

    async def _send_completion(self, client, messages, prefill, *, max_tokens, temperature, top_p, top_logprobs) -> Reply:
        """The raw completions endpoint, on the chat-templated conversation followed by `prefill`."""
        prompt = await self._prompt_text(client, messages) + prefill
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p}
        if top_logprobs:
            body["logprobs"] = top_logprobs  # the legacy format: top alternatives per position as a dict
        data = await client.post("/completions", body=body, cast_to=object)
        choice = data["choices"][0]
        text = choice.get("text") or ""
        logprobs = None
        legacy = choice.get("logprobs") if top_logprobs else None
        if legacy and legacy.get("tokens"):
            tops = legacy.get("top_logprobs") or [{}] * len(legacy["tokens"])
            logprobs = [(token, list((top or {}).items())) for token, top in zip(legacy["tokens"], tops)]
        return Reply(text, *self._usage_of(data, messages, text), logprobs=logprobs)

    def _usage_of(self, data: dict, messages: list[dict], text: str) -> tuple[int, int]:
        usage = data.get("usage") or {}
        input_tokens, output_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if input_tokens is None or output_tokens is None:  # some servers leave usage out: estimate
            input_tokens, _ = self._estimate_tokens(messages, 0)
            output_tokens = -(-len(text) // 4)
        return input_tokens, output_tokens
