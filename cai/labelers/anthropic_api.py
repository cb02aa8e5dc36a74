"""The Anthropic Messages labeler (the Anthropic API, or a compatible server via `labeler.base_url`).

The Messages API returns no log-probabilities, so choices are always votes; the answer prefix
("The answer is: (") is prefilled as the start of the assistant turn, so the label comes next (on
models that refuse prefill, with a 400, the engine asks without it from then on). Current versions of
the API and SDK take no temperature or top_p: requests' sampling parameters are part of the cache
key but not sent, and the model samples with its defaults.

Like the OpenAI backend, requests go through the `anthropic` client's own `post` with a plain JSON body.
"""

from __future__ import annotations

from cai.labelers.api_common import ApiLabeler, Reply, aiohttp_transport


class AnthropicLabeler(ApiLabeler):
    backend = "anthropic"
    default_key_env = "ANTHROPIC_API_KEY"
    hosted_hosts = {"api.anthropic.com"}
    supports_logprobs = False
    supports_prefill = True

    def _client(self):
        import anthropic

        return anthropic.AsyncAnthropic(api_key=self._api_key, base_url=self.base_url, max_retries=0,
                                        timeout=self.timeout, http_client=aiohttp_transport(anthropic))

    async def _send(self, client, messages, *, max_tokens, temperature, top_p, top_logprobs=None, prefill=None,
                    prefill_way=None) -> Reply:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        if prefill:
            turns.append({"role": "assistant", "content": prefill})
        body = {"model": self.model, "messages": turns, "max_tokens": max_tokens}
        if system:
            body["system"] = system
        data = await client.post("/v1/messages", body=body, cast_to=object)
        text = "".join(block.get("text", "") for block in data["content"] if block.get("type") == "text")
        usage = data.get("usage") or {}
        return Reply(text, usage.get("input_tokens") or 0, usage.get("output_tokens") or 0,
                     refusal=data.get("stop_reason") == "refusal")
