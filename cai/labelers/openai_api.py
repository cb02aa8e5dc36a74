"""The OpenAI Chat Completions labeler: the OpenAI API, or any OpenAI-compatible server (vLLM,
llama.cpp's server, Ollama, TGI...) through `labeler.base_url`.

Choices come from `logprobs`/`top_logprobs` where the server returns them (OpenAI, vLLM and
llama.cpp's server do), else from votes; the engine is in api_common.py.

Requests go through the `openai` client's own `post` (its documented way to send a request it does
not model) with the Chat Completions body as plain JSON: the client still builds the request,
authenticates and raises its typed errors, but skips validating and rebuilding every body, which
otherwise costs about as much CPU as the HTTP itself when hundreds of requests are in flight.
"""

from __future__ import annotations

from cai.labelers.api_common import ApiLabeler, Reply, aiohttp_transport


class OpenAILabeler(ApiLabeler):
    backend = "openai"
    default_key_env = "OPENAI_API_KEY"
    hosted_hosts = {"api.openai.com"}
    supports_logprobs = True
    supports_prefill = False  # Chat Completions has no assistant prefill: an instruction asks for the label

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

    async def _send(self, client, messages, *, max_tokens, temperature, top_p, top_logprobs=None, prefill=None) -> Reply:
        body = {"model": self.model, "messages": messages, "temperature": temperature, "top_p": top_p,
                self._max_tokens_field: max_tokens}
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
        usage = data.get("usage") or {}
        input_tokens, output_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if input_tokens is None or output_tokens is None:  # some servers leave usage out: estimate
            input_tokens, _ = self._estimate_tokens(messages, 0)
            output_tokens = -(-len(text) // 4)
        return Reply(text, input_tokens, output_tokens, refusal=bool(message.get("refusal")), logprobs=logprobs)
