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


def build_labeler(cfg, shared_models: dict | None = None) -> Labeler:
    """The labeler named by `cfg.labeler` (cfg is the whole cai.config.Config).

    `shared_models` maps a resolved model name to an already loaded (model, tokenizer), so that a
    local labeler that is the same model as the policy does not load it twice.
    """
    backend = cfg.labeler.backend
    if backend == "local":
        from cai.labelers.local import LocalLabeler

        return LocalLabeler.from_config(cfg, shared_models=shared_models)
    raise NotImplementedError(f"labeler.backend={backend} is not available yet")
