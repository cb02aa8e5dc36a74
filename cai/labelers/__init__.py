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


ROLES = ("text", "choices", "judge")
ROLE_KEYS = {"text": "labeler", "choices": "choice_labeler", "judge": "eval.judge"}


def labeler_config(cfg, role: str = "text"):
    """The labeler config (cai.config.LabelerConfig) that does one job of a run.

    - text: critiques and revisions (and chain-of-thought reasoning): `labeler`;
    - choices: preference labels, d-RLAIF scores, the labeler audit: `choice_labeler`, else `labeler`;
    - judge: the evaluation: `eval.judge`, else the choice labeler (a circular evaluation).
    """
    if role == "text":
        return cfg.labeler
    if role == "choices":
        return cfg.choice_labeler or cfg.labeler
    if role == "judge":
        return cfg.eval.judge or labeler_config(cfg, "choices")
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def role_key(cfg, role: str) -> str:
    """The config key whose labeler does `role` in this run (for messages and the report)."""
    if role == "judge" and cfg.eval.judge is None:
        return role_key(cfg, "choices")
    if role == "choices" and cfg.choice_labeler is None:
        return "labeler"
    return ROLE_KEYS[role]


def circular_judge(cfg) -> bool:
    """True when the evaluation judge is configured exactly as the labeler that made the preference labels."""
    return labeler_config(cfg, "judge").model_dump() == labeler_config(cfg, "choices").model_dump()


def require_writer(cfg, role: str, job: str) -> None:
    """A one-line CaiError, before any model loads, when `role`'s labeler cannot write the text `job` needs."""
    if labeler_config(cfg, role).backend == "rules":
        from cai.errors import CaiError

        raise CaiError(f"{role_key(cfg, role)}.backend=rules cannot write {job}: the rules judge answers choices "
                       f"only; set {role_key(cfg, role)}.backend to local, openai or anthropic")


def check_api_key(cfg, roles: tuple[str, ...] = ("text",)) -> None:
    """The API key of each labeler that does one of `roles` is in its environment variable (one line
    naming the variable if not), checked before a stage makes its folder; local and rules need none."""
    from cai.labelers.api_common import resolve_api_key

    for role in dict.fromkeys(roles):
        lab = labeler_config(cfg, role)
        if lab.backend == "openai":
            from cai.labelers.openai_api import OpenAILabeler as backend_class
        elif lab.backend == "anthropic":
            from cai.labelers.anthropic_api import AnthropicLabeler as backend_class
        else:
            continue
        env = lab.api_key_env or backend_class.default_key_env
        resolve_api_key(lab.backend, env, lab.base_url, backend_class.hosted_hosts, config_key=role_key(cfg, role))


def build_labeler(cfg, shared_models: dict | None = None, role: str = "text") -> Labeler:
    """The labeler that does `role` (see `labeler_config`); cfg is the whole cai.config.Config.

    `shared_models` maps a resolved model name to an already loaded (model, tokenizer), so that a
    local labeler that is the same model as the policy does not load it twice. With
    `labeler.cache` (the default) the labeler is wrapped in the on-disk answer cache (cache.py);
    the rules judge is exact and instant, so it is never cached.
    """
    section = labeler_config(cfg, role)
    if section is not cfg.labeler:  # the backends read cfg.labeler
        cfg = cfg.model_copy(update={"labeler": section})
    backend = section.backend
    if backend == "rules":
        from cai.labelers.rules import RulesLabeler

        return RulesLabeler.from_config(cfg)
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
    if section.cache:
        from cai.labelers.cache import CachedLabeler, default_cache_path

        labeler = CachedLabeler(labeler, default_cache_path(cfg))
    return labeler
