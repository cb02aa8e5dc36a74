"""Where the policy samples its answers: in this process (LocalGenerator, transformers' generate) or
on an OpenAI-compatible inference server (`policy.base_url`, e.g. `vllm serve out/run/sft`).

`open_policy(cfg, source)` is the one swap point the sampling stages use: both kinds have
`generate(requests, desc=None) -> list[Generation]` and `close()`. On a server, sampling goes through
the API labelers' engine (concurrency, retries, pools with failover) and the same on-disk answer
cache, so a stage killed halfway and rerun sends nothing for the answers it already had; what it
sent is added to `<stage>/policy_usage.json` when the stage closes it (`close_policy`).

Before the first request the server is asked what it serves (`GET /models`): the stage's model must
be among the names, or the stage stops with one line. The stage's model is `source` as the stage
names it (`policy.model` for sl, the sft folder for prefs, each compared model's source for eval) or
the name the config gives it (`policy.served_model`, `eval.served_models`); a folder matches a served
name that is the same folder (vLLM names a model by the path it was started with).
"""

from __future__ import annotations

from pathlib import Path

from cai.errors import CaiError
from cai.labelers.base import GenerateRequest, Generation
from cai.labelers.openai_api import OpenAILabeler
from cai.records import record_usage


def _weights_signature(source: str) -> list:
    """Names, sizes and times of a local folder's weights: a retrained model is another cache key."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return []
    return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in path.glob("*.safetensors"))


def _same_model(served: str, expected: str) -> bool:
    if served == expected:
        return True
    a, b = Path(served).expanduser(), Path(expected).expanduser()
    return a.is_dir() and b.is_dir() and a.resolve() == b.resolve()


class ServerPolicy(OpenAILabeler):
    """The policy sampled on an OpenAI-compatible server (one URL or a pool)."""

    def __init__(self, served_model: str, source: str, name_key: str = "policy.served_model", **kwargs):
        super().__init__(served_model, **kwargs)
        self.source = source
        self.name_key = name_key  # the config key that names the model on the server, for the one-line error
        self.id = f"policy-server:{served_model}@" + self.id.split("@", 1)[-1]

    def cache_params(self, kind: str) -> dict:
        # Not the server's URL: the model (its name and, for a local folder, its weights) decides.
        return {"backend": "policy-server", "model": self.model, "weights": _weights_signature(self.source),
                "system_prompt": self.system_prompt}

    def check_served_model(self) -> None:
        """One line, before anything is sampled, when the server does not serve the stage's model."""
        import openai

        urls = self._pool.urls if self._pool else [self.base_url]
        for url in urls:
            client = openai.OpenAI(base_url=url, api_key=self._api_key, max_retries=1, timeout=self.timeout)
            try:
                served = [m.id for m in client.models.list()]
            except openai.APIConnectionError:
                raise CaiError(f"policy.base_url: no server answers at {url}; start one on the stage's model "
                               f"(vllm serve {self.source}) or unset policy.base_url") from None
            except openai.APIStatusError as err:
                raise CaiError(f"policy.base_url: {url}/models answered HTTP {err.status_code}") from None
            finally:
                client.close()
            if not any(_same_model(name, self.model) for name in served):
                raise CaiError(f"policy.base_url: {url} serves {served}, not the model this stage samples "
                               f"({self.model}); start the server on it, or set {self.name_key} to the "
                               f"name it serves that model under")


class _ServerSampler:
    """A ServerPolicy behind the answer cache, with the LocalGenerator's `generate`/`close`."""

    def __init__(self, cfg, source: str, served_model: str | None = None, name_key: str = "policy.served_model"):
        from cai.labelers.cache import CachedLabeler, default_cache_path

        self.server = _server_policy(cfg, source, served_model, name_key)
        self.server.check_served_model()
        self.sampler = CachedLabeler(self.server, default_cache_path(cfg))
        self.id = self.server.id

    @property
    def usage(self):
        return self.sampler.usage

    def generate(self, requests: list[GenerateRequest], desc: str | None = None) -> list[Generation]:
        return self.sampler.generate(requests, desc=desc)

    def close(self) -> None:
        self.sampler.close()


def check_policy(cfg, source: str, served_model: str | None = None, name_key: str = "policy.served_model") -> None:
    """Before a stage writes anything: the model's weights can be found here (local sampling), or
    the server at `policy.base_url` serves it (under `served_model`, default `policy.served_model`
    or `source`; `name_key` is the config key that sets it). One line (CaiError) otherwise."""
    if not cfg.policy.base_url:
        from cai.models import resolve_model

        resolve_model(source, cfg.cache_dir)
        return
    server = _server_policy(cfg, source, served_model, name_key)
    try:
        server.check_served_model()
    finally:
        server.close()


def _server_policy(cfg, source: str, served_model: str | None = None, name_key: str = "policy.served_model") -> ServerPolicy:
    policy = cfg.policy
    return ServerPolicy(
        served_model or policy.served_model or source, source, name_key, base_url=policy.base_url, api_key_env=policy.api_key_env,
        system_prompt=policy.system_prompt, concurrency=policy.concurrency, timeout=cfg.labeler.timeout,
        max_tries=cfg.labeler.max_tries, price=(0.0, 0.0), server_failures=cfg.labeler.server_failures,
        server_bench_seconds=cfg.labeler.server_bench_seconds,
    )


def open_policy(cfg, source: str, shared: dict | None = None, served_model: str | None = None,
                name_key: str = "policy.served_model"):
    """The policy's sampler for model `source`: on `cfg.policy.base_url` when set (asked for under
    `served_model`, as in check_policy), else a LocalGenerator (its weights loaded into `shared`, so
    that a local labeler of the same model reuses them)."""
    if cfg.policy.base_url:
        return _ServerSampler(cfg, source, served_model, name_key)
    from cai.labelers.local import LocalGenerator
    from cai.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(source, cfg, shared)
    return LocalGenerator(model, tokenizer, cfg.policy.batch_size, cfg.seed, cfg.policy.system_prompt)


def close_policy(policy, stage_path: str | Path) -> None:
    """Close a sampler from open_policy; a server's usage (requests, tokens, requests per server of a
    pool) is added to `<stage>/policy_usage.json`, the way the labeler's goes to labeler_usage.json."""
    try:
        if isinstance(policy, _ServerSampler):
            record_usage(stage_path, policy, "policy")
    finally:
        policy.close()
