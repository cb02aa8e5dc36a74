"""AI labelers behind one protocol (see base.py); `build_labeler` picks the backend from config.

SDKs are imported only inside the backend that uses them, so a local run never needs openai/anthropic.
"""

from __future__ import annotations

from cai.labelers.base import (  # noqa: F401
    BudgetExceeded,
    Choice,
    ChoiceRequest,
    GenerateRequest,
    Generation,
    Labeler,
    Usage,
)


def check_api_key(cfg) -> None:
    """An API backend's key is in its environment variable (one line naming the variable if not), checked
    before a stage makes its folder; the local backend needs none."""
    backend = cfg.labeler.backend
    if backend == "openai":
        from cai.labelers.openai_api import OpenAILabeler as backend_class
    elif backend == "anthropic":
        from cai.labelers.anthropic_api import AnthropicLabeler as backend_class
    else:
        return
    from cai.labelers.api_common import resolve_api_key

    env = cfg.labeler.api_key_env or backend_class.default_key_env
    resolve_api_key(backend, env, cfg.labeler.base_url, backend_class.hosted_hosts)


def build_labeler(cfg, shared_models: dict | None = None) -> Labeler:
    """The labeler named by `cfg.labeler` (cfg is the whole cai.config.Config).

    `shared_models` maps a resolved model name to an already loaded (model, tokenizer), so that a
    local labeler that is the same model as the policy does not load it twice. With
    `labeler.cache` (the default) the labeler is wrapped in the on-disk answer cache (cache.py).
    """
    backend = cfg.labeler.backend
    if backend == "local":
        from cai.labelers.local import LocalLabeler

        labeler = LocalLabeler.from_config(cfg, shared_models=shared_models)
    elif backend == "openai":
        from cai.labelers.openai_api import OpenAILabeler

        labeler = OpenAILabeler.from_config(cfg)
    elif backend == "anthropic":
        from cai.labelers.anthropic_api import AnthropicLabeler

        labeler = AnthropicLabeler.from_config(cfg)
    else:
        raise NotImplementedError(f"labeler.backend={backend} is not available yet")
    if cfg.labeler.cache:
        from cai.labelers.cache import CachedLabeler, default_cache_path

        labeler = CachedLabeler(labeler, default_cache_path(cfg))
    return labeler
