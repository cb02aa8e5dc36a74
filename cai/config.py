"""Typed run configuration: a YAML file plus dotted overrides from the command line.

Every key is declared once, here, with its help text (`cai config-keys` prints them). Unknown keys
are errors that list the valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cai.errors import CaiError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PolicyConfig(Section):
    model: str = Field(
        "smollm2-135m-instruct",
        description="Policy model: the alias smollm2-135m-instruct, a Hugging Face id or a local folder.",
    )
    max_new_tokens: int = Field(128, ge=1, description="Longest answer the policy writes, in tokens.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature of the policy (0 = greedy).")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling threshold of the policy.")
    batch_size: int = Field(8, ge=1, description="Prompts per generation batch.")
    system_prompt: str | None = Field(None, description="Optional system message put before every prompt.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype: auto = float32 on CPU, bfloat16 on GPU."
    )


class LabelerConfig(Section):
    backend: Literal["local", "openai", "anthropic"] = Field(
        "local", description="Who gives the AI feedback: a local transformers model or an API."
    )
    model: str = Field(
        "smollm2-135m-instruct",
        description="Labeler model: an alias/HF id/folder for local, the API's model name otherwise.",
    )
    base_url: str | None = Field(
        None, description="API endpoint, e.g. http://localhost:8000/v1 for a vLLM or llama.cpp server."
    )
    api_key_env: str | None = Field(
        None,
        description="Environment variable holding the API key (default OPENAI_API_KEY / ANTHROPIC_API_KEY).",
    )
    max_new_tokens: int = Field(128, ge=1, description="Longest critique or revision, in tokens.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature for critiques and revisions.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling threshold of the labeler.")
    batch_size: int = Field(8, ge=1, description="Requests per batch for the local backend.")
    system_prompt: str | None = Field(None, description="Optional system message for every labeler request.")
    concurrency: int = Field(8, ge=1, description="API requests in flight at once.")
    requests_per_minute: float | None = Field(None, gt=0, description="API rate limit (None = unlimited).")
    tokens_per_minute: float | None = Field(None, gt=0, description="API token rate limit (None = unlimited).")
    timeout: float = Field(60.0, gt=0, description="Seconds before one API request is abandoned and retried.")
    max_tries: int = Field(6, ge=1, description="Attempts per API request before it is recorded as failed.")
    max_parse_retries: int = Field(
        2, ge=0, description="Retries with a stricter instruction when an answer cannot be parsed."
    )
    vote_samples: int = Field(
        8, ge=1, description="Samples per choice when the backend returns no log-probabilities."
    )
    choice_method: Literal["auto", "logprobs", "votes"] = Field(
        "auto", description="How option probabilities are obtained: auto tries log-probabilities first."
    )
    max_requests: int | None = Field(None, ge=0, description="Hard cap on API requests per stage.")
    max_cost: float | None = Field(None, ge=0, description="Hard cap on estimated API cost (USD) per stage.")
    prices: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="USD per million (input, output) tokens, by model name, for cost accounting.",
    )
    cache: bool = Field(True, description="Keep every labeler answer in the on-disk cache.")


class DataConfig(Section):
    red_team: str = Field(
        "builtin", description="Red-team prompts: builtin, a JSONL/CSV path, or a datasets name."
    )
    helpful: str = Field("builtin", description="Helpful prompts: builtin, a JSONL/CSV path, or a datasets name.")
    column: str = Field("prompt", description="Column holding the prompt text in a file or dataset.")
    split: str = Field("train", description="Split to read when data.* names a datasets dataset.")
    limit: int | None = Field(None, ge=1, description="Use at most this many prompts of each kind (after shuffling).")
    fractions: dict[str, float] = Field(
        default_factory=lambda: {"sl": 0.4, "prefs": 0.3, "rl": 0.2, "eval": 0.1},
        description="Share of prompts for each split (sl, prefs, rl, eval); seeded, disjoint.",
    )

    @field_validator("fractions")
    @classmethod
    def _check_fractions(cls, value: dict[str, float]) -> dict[str, float]:
        expected = {"sl", "prefs", "rl", "eval"}
        if set(value) != expected:
            raise ValueError(f"needs exactly the keys {sorted(expected)}, got {sorted(value)}")
        if any(v < 0 for v in value.values()) or abs(sum(value.values()) - 1.0) > 1e-6:
            raise ValueError(f"must be non-negative and sum to 1, got {value}")
        return value


class SLConfig(Section):
    rounds: int = Field(1, ge=1, description="Critique-revision rounds per red-team prompt (the paper uses 4).")
    helpful_ratio: float = Field(
        0.5, ge=0.0, description="Helpful prompts (answers kept) per red-team prompt in the SL-CAI dataset."
    )
    few_shot: bool = Field(True, description="Show the constitution's critique/revision examples to the labeler.")


class SFTConfig(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the SL-CAI dataset.")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    batch_size: int = Field(4, ge=1, description="Examples per device per step.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(512, ge=16, description="Truncate conversations to this many tokens.")
    lora: bool = Field(False, description="Train a LoRA adapter (peft) instead of all weights.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    assistant_only_loss: bool = Field(
        True, description="Loss on assistant turns only, where the chat template marks them."
    )
    bf16: bool | None = Field(None, description="Train in bf16 (None = on when a GPU supports it).")
    merge_lora: bool = Field(True, description="Save the LoRA weights merged into the base model.")
    logging_steps: int = Field(5, ge=1, description="Log the training loss every this many steps.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every this many steps (a killed run resumes there).")
    report_to: str = Field("none", description="Tracker for TRL's trainer: none, tensorboard, wandb...")


class PrefsConfig(Section):
    """The preference stage (owner: prefs.py). Keys are added here with their help text."""

    samples_per_prompt: int = Field(2, ge=2, description="Answers the SFT model samples per prompt (K); pairs are formed from them.")


class RMConfig(Section):
    """The reward-model stage (owner: rm.py)."""

    epochs: float = Field(1.0, gt=0, description="Passes over the preference dataset.")


class RLConfig(Section):
    """The RL stage (owner: rl.py)."""

    algorithm: Literal["ppo", "dpo", "grpo", "rloo"] = Field("ppo", description="RL algorithm.")


class Config(Section):
    output_dir: str = Field("out/run", description="Folder that receives every stage's output.")
    seed: int = Field(0, description="Seed for splits, principle sampling and generation.")
    constitution: str = Field("constitutions/harmless.yaml", description="Path of the constitution YAML.")
    templates: str | None = Field(
        None, description="Folder of jinja2 prompt templates overriding the shipped prompts/ (per file)."
    )
    cache_dir: str = Field(
        "~/.cache/cai", description="Where converted models and the labeler answer cache are kept."
    )
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    labeler: LabelerConfig = Field(default_factory=LabelerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sl: SLConfig = Field(default_factory=SLConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    prefs: PrefsConfig = Field(default_factory=PrefsConfig)
    rm: RMConfig = Field(default_factory=RMConfig)
    rl: RLConfig = Field(default_factory=RLConfig)


# ---------------------------------------------------------------------------------------------
# Loading, overrides, fingerprints


def config_keys() -> list[tuple[str, str, Any]]:
    """(dotted key, help text, default) for every config key."""
    rows = []

    def walk(model: type[BaseModel], instance: BaseModel, prefix: str) -> None:
        for name, field in model.model_fields.items():
            value = getattr(instance, name)
            if isinstance(value, BaseModel):
                walk(type(value), value, f"{prefix}{name}.")
            else:
                rows.append((f"{prefix}{name}", field.description or "", value))

    walk(Config, Config(), "")
    return rows


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value` -> (key.path, value parsed as YAML, so 3 is an int and null is None)."""
    if "=" not in text:
        raise CaiError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        model: type[BaseModel] = Config
        for part in first["loc"][:-1]:
            model = model.model_fields[str(part)].annotation  # type: ignore[assignment]
        prefix = ".".join(str(p) for p in first["loc"][:-1])
        valid = [f"{prefix}.{name}" if prefix else name for name in model.model_fields]
        return f"{source}: unknown key '{loc}'; valid keys here: {', '.join(valid)}"
    return f"{source}: {loc}: {first['msg']} (got {first.get('input')!r})"


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `key.path=value` overrides, validate."""
    tree: dict = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CaiError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise CaiError(f"{path}:{where} invalid YAML: {getattr(err, 'problem', err)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise CaiError(f"{path}: a config must be a mapping of keys, got {type(loaded).__name__}")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        raise CaiError(_format_validation_error(err, source)) from None
    # Shipped constitutions and template folders are found from any working directory.
    for key in ("constitution", "templates"):
        value = getattr(cfg, key)
        if value and not Path(value).expanduser().exists() and (PROJECT_ROOT / value).exists():
            setattr(cfg, key, str(PROJECT_ROOT / value))
    return cfg


def config_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
