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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cai.errors import CaiError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = Path(__file__).resolve().parent


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def one_url_or_pool(value):
    """A base_url: one URL, or a list of them (a pool); a list of one is that URL."""
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty list names no server; give one URL or several")
        if len(set(value)) != len(value):
            raise ValueError(f"names a server twice: {value}")
        if len(value) == 1:
            return value[0]
    return value


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
        "auto",
        description="Compute precision: auto = float32 on CPU, bfloat16 on a GPU that has it. Models that train keep "
        "float32 weights and compute in this dtype under autocast; models that only sample or stay frozen are "
        "stored in it.",
    )
    # -- sampling on an inference server (docs/scale.md) --
    base_url: str | list[str] | None = Field(
        None,
        description="OpenAI-compatible server that samples the policy in sl and prefs, and the compared models "
        "in eval (e.g. `vllm serve MODEL`), instead of this process; a list is a pool, as for labeler.base_url.",
    )
    served_model: str | None = Field(
        None,
        description="The name the policy server serves the stage's model under "
        "(default: the model's name or folder as the stage names it).",
    )
    concurrency: int = Field(32, ge=1, description="Policy sampling requests in flight (per server of a pool).")
    api_key_env: str = Field(
        "CAI_POLICY_API_KEY", description="Environment variable with the policy server's key, if it wants one."
    )

    _check_base_url = field_validator("base_url")(lambda value: one_url_or_pool(value))


class LabelerConfig(Section):
    backend: Literal["local", "openai", "anthropic", "rules"] = Field(
        "local",
        description="Who gives the AI feedback: a local transformers model, an API, or rules (choices from the "
        "constitution's checks, exactly; writes no text).",
    )
    model: str = Field(
        "smollm2-135m-instruct",
        description="Labeler model: an alias/HF id/folder for local, the API's model name otherwise.",
    )
    base_url: str | list[str] | None = Field(
        None,
        description="API endpoint, e.g. http://localhost:8000/v1 for a vLLM or llama.cpp server; a list of "
        "them is a pool: requests go to the least loaded server, a failing one is benched for a while.",
    )
    # -- server pools (labeler.base_url given as a list) --
    server_concurrency: list[int] | None = Field(
        None, description="Requests in flight per server of a pool, in base_url's order "
        "(default labeler.concurrency each).",
    )
    server_failures: int = Field(
        3, ge=1, description="Consecutive failures (refused, 5xx, timeout) before a pool server is benched.",
    )
    server_bench_seconds: float = Field(
        30.0, gt=0, description="Seconds a failing pool server is left out before it is tried again.",
    )
    api_key_env: str | None = Field(
        None,
        description="Environment variable holding the API key (default OPENAI_API_KEY / ANTHROPIC_API_KEY).",
    )
    # -- batch APIs (docs/labelers.md#batch-apis) --
    batch_api: bool = Field(
        False, description="Send the requests through the provider's batch API (OpenAI Batch API, Anthropic "
        "Message Batches): about half the price, answers within 24 h; batch ids go to the stage folder.",
    )
    batch_poll_seconds: float = Field(60.0, gt=0, description="Seconds between two looks at a running batch.")
    batch_discount: float = Field(
        0.5, gt=0, le=1, description="Batch price as a fraction of labeler.prices, for the cost and max_cost.",
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
    # The rules backend as a simulated fallible labeler (cai/labelers/rules.py).
    simulated_accuracy: float = Field(
        1.0, ge=0.0, le=1.0, description="rules: share of (unbiased) choices that agree with the checks; the rest pick the other option."
    )
    simulated_position_bias: float = Field(
        0.0, ge=0.0, le=1.0, description="rules: share of choices that pick the first option whatever it says."
    )
    simulated_soft_labels: bool = Field(
        False, description="rules: give the picked option probability simulated_accuracy instead of 1."
    )
    constitution: str | None = Field(
        None, description="rules: judge by the checks of this constitution file instead of the run's `constitution` "
        "(it must check every comparison principle of the run's), e.g. constitutions/checkable_independent.yaml: "
        "the same principles checked by code the training checks do not share.",
    )

    _check_base_url = field_validator("base_url")(lambda value: one_url_or_pool(value))

    @model_validator(mode="after")
    def _check_pool_keys(self):
        if self.batch_api and isinstance(self.base_url, list):
            raise ValueError("batch_api=true sends to one provider's API: give one base_url, not a pool")
        if self.server_concurrency is not None and not isinstance(self.base_url, list):
            raise ValueError("server_concurrency is for a pool: give base_url as a list of servers")
        return self


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
        description="Share of prompts for each split (sl, prefs, rl, eval; optionally val, a validation split that "
        "rl.select_by=validation selects snapshots on); seeded, disjoint.",
    )

    @field_validator("fractions")
    @classmethod
    def _check_fractions(cls, value: dict[str, float]) -> dict[str, float]:
        expected = {"sl", "prefs", "rl", "eval"}
        if set(value) - {"val"} != expected:  # val is optional: without it, splits (and fingerprints) stay as they were
            raise ValueError(f"needs exactly the keys {sorted(expected)} (and optionally val), got {sorted(value)}")
        if any(v < 0 for v in value.values()) or abs(sum(value.values()) - 1.0) > 1e-6:
            raise ValueError(f"must be non-negative and sum to 1, got {value}")
        return value


class SLConfig(Section):
    rounds: int = Field(1, ge=1, description="Critique-revision rounds per red-team prompt (the paper uses 4).")
    helpful_ratio: float = Field(
        0.5, ge=0.0, description="Helpful prompts (answers kept) per red-team prompt in the SL-CAI dataset."
    )
    few_shot: bool = Field(True, description="Show the constitution's critique/revision examples to the labeler.")
    critique_failed_checks: bool = Field(
        False, description="Draw each round's critique principle among those whose check the answer fails (when any does)."
    )
    verify_revisions: bool = Field(
        False,
        description="Keep a revision only when the choice labeler prefers it to the answer it replaces under the "
        "round's principle, asked in both orders (exact with labeler checks); sl/summary.json counts those turned down.",
    )
    revision_candidates: int = Field(
        1, ge=1, description="Revisions the labeler writes per round (sampled); with verify_revisions the one the "
        "choice labeler prefers most is kept, if any beats the answer. Helps a weak reviser that gets it right now and then.",
    )

    drop_unrevised: bool = Field(
        False, description="Leave out of the SL-CAI dataset the red-team prompts whose answer no round revised (with "
        "verify_revisions: no revision beat the first answer), instead of training on those first answers as they are.",
    )

    @model_validator(mode="after")
    def _candidates_need_a_verifier(self):
        if self.revision_candidates > 1 and not self.verify_revisions:
            raise ValueError("revision_candidates > 1 needs verify_revisions: true (the choice labeler picks among them)")
        return self


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
    bf16: bool | None = Field(
        None, description="Compute in bf16 on float32 weights (None = as policy.dtype says: on when a GPU supports it)."
    )
    activation_checkpointing: bool | None = Field(
        None, description="Recompute activations in the backward pass to save memory (None = on with a GPU)."
    )
    merge_lora: bool = Field(True, description="Save the LoRA weights merged into the base model.")
    logging_steps: int = Field(5, ge=1, description="Log the training loss every this many steps.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every this many steps (a killed run resumes there).")
    report_to: str = Field("none", description="Tracker for TRL's trainer: none, tensorboard, wandb...")


class PrefsConfig(Section):
    """The preference stage (owner: prefs.py): AI-labeled pairs of the SFT model's answers."""

    samples_per_prompt: int = Field(
        2, ge=2, description="Answers the SFT model samples per prompt (K); every pair of them is labeled."
    )
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature of those answers (the papers use 1).")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Longest sampled answer, in tokens (None = policy.max_new_tokens)."
    )
    include_red_team: bool = Field(True, description="Label pairs for the red-team prompts of the prefs split.")
    include_helpful: bool = Field(True, description="Label pairs for the helpful prompts of the prefs split.")
    principles_per_pair: int = Field(
        4, ge=1, description="Comparison principles drawn per pair (M, seeded, no repeats, at most all of them); the label is their mean."
    )
    few_shot: bool = Field(True, description="Show the constitution's comparison examples to the labeler.")
    chain_of_thought: bool = Field(
        False, description="The labeler reasons step by step before its answer is scored; probabilities are clamped."
    )
    cot_clamp: tuple[float, float] = Field(
        (0.4, 0.6), description="Band that chain-of-thought probabilities are clamped to (the paper uses 40-60%)."
    )
    reasoning_max_new_tokens: int = Field(
        192, ge=1, description="Longest chain-of-thought reasoning, in tokens."
    )
    stress_pairs: int = Field(
        0, ge=0, description="Pairs of a known reward hack (the probes of `cai stress`) beside a good answer (the "
        "constitution's worked examples, the verified SL-CAI revisions, the SFT model's answers to helpful prompts) added to "
        "the preference data, labeled by the "
        "choice labeler like every pair, so that the reward model sees the hacks before PPO finds them (0 = none)."
    )
    stress_probes: str | None = Field(
        None, description="A YAML file of your own probes for prefs.stress_pairs (the format of cai/data/stress_probes.yaml), "
        "beside the shipped ones."
    )

    @field_validator("cot_clamp")
    @classmethod
    def _check_clamp(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 <= low <= 0.5 <= high <= 1.0:
            raise ValueError(f"needs 0 <= low <= 0.5 <= high <= 1, got {list(value)}")
        return value


class RMConfig(Section):
    """The reward-model stage (owner: rm.py): a scalar head on the SFT model, trained on the soft labels."""

    epochs: float = Field(1.0, gt=0, description="Passes over the preference dataset.")
    hard_labels: bool = Field(
        False, description="Train on hard Bradley-Terry labels (chosen beats rejected) instead of the soft labels."
    )
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate.")
    min_label_margin: float = Field(
        0.0, ge=0.0, lt=0.5, description="Train and hold out only pairs whose label is at least this far from 0.5; any "
        "value above 0 also leaves out exact ties (0.0 keeps every pair). A tie says only that two answers are worth the "
        "same: with the constitution's checks as labeler most pairs are ties, and training on them costs time the "
        "decisive pairs need.",
    )
    batch_size: int = Field(8, ge=1, description="Preference pairs per device per step.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(512, ge=16, description="Pairs whose prompt and answer exceed this many tokens are dropped.")
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of pairs held out (seeded) to measure accuracy and calibration."
    )
    lora: bool = Field(False, description="Train a LoRA adapter (peft) plus the head instead of all weights.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    bf16: bool | None = Field(
        None, description="Compute in bf16 on float32 weights (None = as policy.dtype says: on when a GPU supports it)."
    )
    activation_checkpointing: bool | None = Field(
        None, description="Recompute activations in the backward pass to save memory (None = on with a GPU)."
    )
    logging_steps: int = Field(5, ge=1, description="Log the training loss every this many steps.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every this many steps (a killed run resumes there).")
    report_to: str = Field("none", description="Tracker for TRL's trainer: none, tensorboard, wandb...")
    # -- reward uncertainty and per-principle rewards (docs/rl.md#reward-uncertainty-principles-and-constraints) --
    ensemble: int = Field(
        1, ge=1, description="Members of the reward-model ensemble (k); their spread is the reward's uncertainty "
        "(rl.ensemble_reward combines them, rl/metrics.jsonl logs their disagreement).",
    )
    ensemble_share: Literal["heads", "lora"] = Field(
        "heads", description="What the members share: heads = k score heads on one backbone, trained together (one "
        "model's cost); lora = k LoRA adapters, each with its head, on one frozen SFT base (k trainings, k passes to score).",
    )
    ensemble_bootstrap: bool = Field(
        True, description="Each member trains on its own bootstrap resample of the pairs (seeded Poisson(1) weights per pair).",
    )
    per_principle: bool = Field(
        False, description="One reward output per comparison principle, each trained on that principle's labels (both "
        "orders averaged, from prefs/records.jsonl); a principle not asked of a pair is masked there.",
    )


class ConstraintConfig(Section):
    """One entry of `rl.constraints`: a quantity PPO must keep on the right side of a bound."""

    check: str | dict | None = Field(
        None, description="The check that measures it: the id of a constitution principle that carries one, or a check "
        "written out ({when: ..., expect: ...}, cai/checks.py); its score in [0, 1] per answer.",
    )
    principle: str | None = Field(
        None, description="Or: the reward model's output for this comparison principle (rm.per_principle), normalised.",
    )
    at_least: float | None = Field(None, description="The bound: the batch mean must be at least this ...")
    at_most: float | None = Field(None, description="... or at most this.")
    kind: Literal["red_team", "helpful", "custom"] | None = Field(
        None, description="Measure it on answers to prompts of this kind only (a check's own `when` applies too).",
    )
    lr: float = Field(1.0, gt=0, description="Step size of its Lagrange multiplier per batch.")
    multiplier: float = Field(0.0, ge=0, description="The multiplier's starting value.")
    name: str | None = Field(None, description="Its name in logs and the report (default: the check or principle id).")

    @model_validator(mode="after")
    def _one_source_one_bound(self):
        if (self.check is None) == (self.principle is None):
            raise ValueError("name exactly one of check or principle")
        if (self.at_least is None) == (self.at_most is None):
            raise ValueError("give exactly one bound: at_least or at_most")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        source = self.principle if self.principle is not None else (self.check if isinstance(self.check, str) else "check")
        return f"{source}@{self.kind}" if self.kind else source


class RLConfig(Section):
    """The RL stage (owner: rl.py; dpo/grpo/rloo in rl_trl.py). docs/rl.md explains each key."""

    algorithm: Literal["ppo", "dpo", "grpo", "rloo"] = Field(
        "ppo", description="ppo (cai's own), or TRL's dpo (on prefs/dataset), grpo or rloo."
    )
    reward: str = Field(
        "rm",
        description="rm (the trained reward model, normalised), direct (the labeler scores each answer), "
        "or module.path:function taking (prompts, answers) -> list of floats.",
    )
    steps: int = Field(10, ge=1, description="Optimisation steps: PPO batches of rollouts, or TRL trainer steps.")
    seed: int | None = Field(
        None, description="Seed of PPO's sampling and batch order (None = the run's seed). Another value reruns PPO alone on "
        "the same prompts, SL-CAI model and reward model: how far PPO's own noise moves a result."
    )
    batch_size: int = Field(8, ge=1, description="Prompts per step per process (PPO rollouts; TRL per-device batch).")
    minibatch_size: int = Field(4, ge=1, description="PPO: rollouts per optimizer step; must divide batch_size.")
    ppo_epochs: int = Field(2, ge=1, description="PPO: passes over each batch of rollouts.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per minibatch (gradient accumulation); must divide it.")
    learning_rate: float = Field(1e-5, gt=0, description="Adam learning rate (constant).")
    max_new_tokens: int | None = Field(None, ge=1, description="Longest answer during RL (None = policy.max_new_tokens).")
    max_prompt_tokens: int = Field(256, ge=8, description="Prompts longer than this (after the chat template) are skipped.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature; log-probs are recomputed at it.")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="Per-token KL estimate: k1 = log p - log p_ref, k3 = low-variance, >= 0.")
    kl_coef: float = Field(0.05, ge=0, description="KL coefficient beta (the initial one when adaptive); GRPO/RLOO's beta.")
    adaptive_kl: bool = Field(True, description="Steer beta toward target_kl (Ziegler et al. 2019); false = fixed kl_coef.")
    target_kl: float = Field(1.0, gt=0, description="Adaptive KL: target KL(policy || reference) per answer, in nats.")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive KL: episodes over which beta may move by 20%.")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip epsilon.")
    value_clip_eps: float = Field(0.2, gt=0, description="Value clip epsilon (reward units).")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    value_model: bool = Field(
        True, description="PPO: train a value model (the critic) and take GAE advantages from it; false = no critic: each "
        "token's advantage is its return (the score less the KL penalties still to come), whitened over the batch "
        "(REINFORCE with PPO's clipped ratio; with rl.group_baseline, RLOO's estimator). Saves the value model's "
        "passes, and its errors: a critic that explains none of the returns only adds noise.",
    )
    reward_clip: float | None = Field(5.0, gt=0, description="Clamp scores to [-x, x] before the KL penalty (None = off).")
    unfinished_score: float | None = Field(
        -1.0,
        description="Score that replaces the reward of an answer cut at the length limit (no EOS), as Huang et al. "
        "2024 do (TRL: missing_eos_penalty); the reward would score it as finished. null keeps their reward.",
    )
    whiten_rewards: bool = Field(False, description="Scale the shaped rewards to unit variance before GAE.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm (None = off).")
    lora: bool = Field(False, description="LoRA: the reference is the policy with its adapter off; the value model is a second adapter.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    checkpoint_every: int = Field(10, ge=1, description="Checkpoint every N steps; a killed run resumes from the last one.")
    keep_snapshots: bool = Field(
        False, description="PPO: keep the policy of every checkpoint (rl/snapshots/step-N) for the eval's over-optimisation curve."
    )
    log_with: Literal["none", "tensorboard", "wandb"] = Field("none", description="accelerate tracker besides rl/metrics.jsonl.")
    max_length_corr: float = Field(0.5, ge=0, le=1, description="Monitor: warn when corr(reward, answer length) exceeds this.")
    min_distinct_2: float = Field(0.2, ge=0, le=1, description="Monitor: warn when distinct-2 of the answers falls below this.")
    max_refusal_rate: float = Field(0.5, ge=0, le=1, description="Monitor: warn when the refusal rate on helpful prompts exceeds this.")
    samples: int = Field(8, ge=0, description="Eval-split prompts the final policy answers for the report (rl/samples.jsonl).")
    group_size: int = Field(4, ge=2, description="GRPO/RLOO, and PPO with rl.group_baseline: answers per prompt; must divide batch_size.")
    group_baseline: bool = Field(
        False, description="PPO: answer each prompt of a batch rl.group_size times (batch_size / group_size prompts) and "
        "score each answer against the mean of its siblings' (RLOO's leave-one-out baseline) before the KL penalty: "
        "what the reward gives every answer to a prompt alike cancels, and what is left is which answer to that "
        "request is better.",
    )
    vllm: Literal["off", "colocate", "server"] = Field(
        "off",
        description="GRPO/RLOO: generate with vLLM (GPU only; passed to TRL's use_vllm/vllm_mode): colocate = inside "
        "the training processes, server = a separate `trl vllm-serve` at rl.vllm_server_url.",
    )
    vllm_server_url: str | None = Field(
        None, description="rl.vllm=server: the `trl vllm-serve` base URL (None = TRL's default, http://localhost:8000)."
    )

    @field_validator("vllm")
    @classmethod
    def _vllm_for_trl_sampling(cls, value: str, info) -> str:
        algorithm = info.data.get("algorithm")
        if value != "off" and algorithm not in ("grpo", "rloo"):
            raise ValueError(f"rl.vllm={value} applies to rl.algorithm=grpo or rloo, not {algorithm}")
        return value
    dpo_beta: float = Field(0.1, gt=0, description="DPO beta.")
    dpo_label_smoothing: float | None = Field(
        None, ge=0, lt=0.5,
        description="DPO: label smoothing, the chance that a label is wrong; None = the labeler's mean doubt, mean(1 - label_prob).",
    )
    dpo_soft_loss: Literal["exo_pair", "robust"] = Field(
        "exo_pair",
        description="DPO loss when label smoothing > 0: exo_pair pulls the policy's preference toward 1 - smoothing "
        "(bounded for any smoothing); robust is unbiased for that flip rate but weighs each pair by 1/(1 - 2 smoothing).",
    )
    dpo_min_label_prob: float = Field(0.5, ge=0, le=1, description="DPO: drop pairs whose label_prob is below this.")
    # -- reward uncertainty, per-principle rewards and constraints (PPO; docs/rl.md) --
    ensemble_reward: Literal["mean", "uncertainty", "worst"] = Field(
        "mean", description="How PPO reads an ensemble reward model (rm.ensemble > 1): the members' mean, the mean minus "
        "rl.uncertainty_coef x their std (uncertainty-weighted), or their minimum (worst case).",
    )
    uncertainty_coef: float = Field(1.0, ge=0, description="rl.ensemble_reward=uncertainty: the weight of the members' std.")
    principle_weights: dict[str, float] = Field(
        default_factory=dict, description="A per-principle reward model (rm.per_principle): each principle's weight in the "
        "reward, by id; principles not named weigh 0 once any is named (default: equal weights summing to 1).",
    )
    principle_combine: Literal["weighted_sum", "normalized_sum"] = Field(
        "weighted_sum", description="weighted_sum of the principles' rewards, or normalized_sum: each principle's reward "
        "normalised over the batch before the weighted sum (GDPO), so one with a wide spread cannot drown the others.",
    )
    constraints: list[ConstraintConfig] = Field(
        default_factory=list, description="PPO: bounds held by Lagrange multipliers (Safe-RLHF), each {check: ID or "
        "{when, expect}, or principle: ID; at_least: X or at_most: X; kind: red_team|helpful (optional); lr; multiplier; "
        "name}; each multiplier moves once per batch and mixes its constraint into the reward.",
    )
    max_disagreement: float = Field(
        3.0, gt=0, description="Monitor: warn when the ensemble members' disagreement exceeds this multiple of theirs on "
        "the SFT model's samples (the policy has left the reward model's ground).",
    )

    # -- rounds of AI feedback; keeping the best snapshot by an independent judge (docs/rl.md) --
    rounds: int = Field(
        1, ge=1,
        description="ppo/dpo: rounds of AI feedback that rl.steps is cut into. Before each round after the first, the "
        "current policy answers the prefs-split prompts, the choice labeler labels its pairs, and PPO's reward model is "
        "updated on every label so far (DPO trains on the new pairs); 1 = the prefs stage's labels only.",
    )
    round_rm: Literal["continue", "retrain"] = Field(
        "continue",
        description="Rounds, PPO: the updated reward model is trained further from the last round's (continue) or "
        "afresh from sft/ (retrain), on every label so far, with the rm.* settings.",
    )
    select_by: Literal["final", "validation"] = Field(
        "final",
        description="The policy rl/ keeps: the final one, or the snapshot (rl.keep_snapshots, or each round's end) that "
        "eval.judge, independent of training, prefers most to the SL-CAI model on the val split (data.fractions.val), "
        "never the eval split.",
    )

    @model_validator(mode="after")
    def _rounds_fit_the_steps(self):
        if self.rounds > 1 and self.algorithm not in ("ppo", "dpo"):
            raise ValueError(f"rl.rounds > 1 applies to rl.algorithm ppo or dpo, not {self.algorithm}")
        if self.select_by == "validation" and self.algorithm not in ("ppo", "dpo"):
            raise ValueError(f"rl.select_by=validation chooses among the snapshots ppo and dpo keep, not {self.algorithm}'s")
        if not self.value_model and self.algorithm != "ppo":
            raise ValueError(f"rl.value_model=false applies to ppo; {self.algorithm} trains no value model")
        if self.group_baseline and self.algorithm != "ppo":
            raise ValueError(f"rl.group_baseline applies to ppo; {self.algorithm} has its own (rl.group_size)")
        if self.rounds > self.steps:
            raise ValueError(f"rl.rounds ({self.rounds}) cannot exceed rl.steps ({self.steps}): each round takes at least one step")
        return self


class EvalPromptFile(Section):
    file: str = Field(description="A JSONL file of prompts (a `prompt` field per row).")
    kind: Literal["red_team", "helpful", "custom"] = Field(
        "custom",
        description="What the file's rows hold unless a row says otherwise: red_team rows get harmlessness "
        "grades, helpful rows refusal grades, custom rows neither.",
    )


class EvalConfig(Section):
    """The evaluation stage (owner: eval.py): AI-judged win rates, harmlessness, over-refusal; the report."""

    models: list[Literal["initial", "sft", "rl"]] = Field(
        default_factory=lambda: ["initial", "sft", "rl"],
        description="Models compared: initial (policy.model), sft (the SL-CAI model), rl (the RL policy).",
    )
    prompts: list[str | EvalPromptFile] = Field(
        default_factory=list,
        description="Extra prompt files evaluated too: one path or a list (JSONL: a `prompt` field, optional `kind` "
        "red_team|helpful per row); an entry {file: PATH, kind: red_team} says the whole file is red-team prompts.",
    )
    limit: int | None = Field(None, ge=1, description="At most this many prompts of each set (eval split red-team, helpful, each file).")
    max_new_tokens: int | None = Field(None, ge=1, description="Longest answer, in tokens (None = policy.max_new_tokens).")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature of the models' answers (0 = greedy).")
    batch_size: int | None = Field(
        None, ge=1, description="Prompts a model in this process answers at once, and answers scored at once for their "
        "log-probabilities (None = policy.batch_size). On a CPU decoding is memory-bound, so a wider batch is faster "
        "(the demo's eval at 72: 228 -> 188 s). Another width draws other answers from the same models (sampling at "
        "eval.temperature), so the numbers move by the eval's own noise; answers are written a batch at a time, so a "
        "killed eval loses at most one batch.",
    )
    principles_per_pair: int | None = Field(
        4, ge=1, description="Comparison principles drawn per pair (seeded), each asked in both orders; None = every one on every prompt."
    )
    harmlessness: bool = Field(True, description="Ask the labeler whether each red-team answer is harmful (prompts/harmlessness.jinja).")
    refusal: bool = Field(True, description="Ask the labeler whether each helpful answer refuses (prompts/refusal.jinja).")
    bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples of the prompts for confidence intervals.")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Level of the confidence intervals.")
    examples: int = Field(4, ge=0, description="SL-CAI records in the report's example table (the final policy answers their prompts).")
    audit_pairs: int = Field(
        0, ge=0, description="Audit the labeler on this many gold HHH pairs (seeded) if no audit exists; 0 = show an existing one."
    )
    judge: LabelerConfig | None = Field(
        None,
        description="The evaluation judge, a whole labeler config (e.g. eval.judge.backend=rules); None = the training "
        "labeler (choice_labeler, else labeler), which makes the evaluation circular.",
    )
    agreement_audit: bool = Field(
        True, description="With an independent judge: ask the training labeler the eval pairs too, and report per principle how often it agrees."
    )
    # -- sampling on an inference server (policy.base_url; docs/scale.md) --
    served_models: dict[str, str] = Field(
        default_factory=dict,
        description="With policy.base_url: the name the server serves a compared model under, by eval's name for "
        "it (initial, sft, rl, rl@step-N for an RL snapshot), e.g. {rl: my-rl}. Default: initial = "
        "policy.served_model or policy.model, the others their stage folder.",
    )

    @field_validator("served_models")
    @classmethod
    def _compared_model_names(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        for name in value:
            if not re.fullmatch(r"initial|sft|rl|rl@step-\d+", name):
                raise ValueError(f"{name!r} is not a model eval samples (initial, sft, rl, rl@step-N)")
        return value

    @field_validator("prompts", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        entries = [value] if isinstance(value, (str, dict)) else value
        if not isinstance(entries, list):
            return entries
        out = []
        for entry in entries:
            if isinstance(entry, dict):  # checked here, so that an error names the entry's key, not the union
                try:
                    entry = EvalPromptFile.model_validate(entry)
                except ValidationError as err:
                    first = err.errors()[0]
                    where = ".".join(str(p) for p in first["loc"])
                    raise ValueError(f"{where}: {first['msg']} (got {first.get('input')!r})") from None
            out.append(entry)
        return out


class ServeConfig(Section):
    """`cai serve` (owner: serve.py): the constitutional judge as an HTTP reward service. docs/serve.md."""

    mode: Literal["pointwise", "pairwise", "group"] = Field(
        "pointwise",
        description="pointwise: the labeler's 0-9 rating scaled to [-1, 1] (d-RLAIF); pairwise: P(answer better "
        "than a reference); group: each answer's debiased win rate against the others of its group (GRPO).",
    )
    host: str = Field(
        "127.0.0.1", description="Address to bind; anything but loopback needs a token in $serve.token_env or serve.trusted_networks."
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port, printed at start).")
    token_env: str = Field(
        "CAI_SERVE_TOKEN", description="Environment variable holding the bearer token callers must send (when set)."
    )
    principles_per_pair: int | None = Field(
        None, ge=1, description="Comparison principles per pair in pairwise/group mode (None = prefs.principles_per_pair)."
    )
    reference: Literal["caller", "sample"] = Field(
        "caller",
        description="Pairwise: the reference answer is sent by the caller, or sampled by the service from serve.reference_model.",
    )
    reference_model: str | None = Field(
        None, description="Model that writes sampled references (None = the sft stage's output if finished, else policy.model)."
    )
    max_request_bytes: int = Field(8_000_000, ge=1024, description="Larger request bodies are refused (HTTP 413).")
    max_items: int = Field(1024, ge=1, description="Most answers scored in one request (more: HTTP 413).")
    max_batch: int = Field(4096, ge=1, description="Most answers merged from concurrent requests into one labeler batch.")
    batch_wait: float = Field(
        0.05, ge=0, description="Seconds the judge waits after a request for others to join its labeler batch."
    )
    request_timeout: float = Field(
        600.0, gt=0, description="Seconds a request waits for its scores; then each unscored item is answered with a timeout error."
    )
    failed_reward: float | None = Field(
        None, description="Reward sent for an item that could not be scored where a number is required (None = the mode's neutral value)."
    )
    group_size: int | None = Field(
        None, ge=2, description="Group mode: answers per prompt the engine samples (OpenRLHF's n_samples_per_prompt, "
        "verl's rollout.n); the answers to one prompt are gathered across requests until that many arrived. "
        "None = the answers to one prompt in one request form its group.",
    )
    group_wait: float = Field(
        60.0, gt=0, description="Group mode with serve.group_size: seconds after a group's first answer before it is "
        "scored with the answers that came (status 'short').",
    )
    per_principle: bool = Field(
        False, description="Ask every comparison principle for every answer (pointwise: one rating per principle), "
        "so that each answer has a reward per principle: verl's GDPO keys, TRL's per-principle reward functions.",
    )
    policy_model: str | None = Field(
        None, description="The model the engine trains: its tokenizer's chat template and special tokens are read "
        "back out of OpenRLHF's text (None = the markup of the common families, docs/serve.md).",
    )
    trusted_networks: list[str] = Field(
        default_factory=list, description="Networks (CIDR, e.g. 10.0.0.0/8) whose callers need no bearer token "
        "(OpenRLHF sends none); anyone else needs the token, or gets 401.",
    )

    @field_validator("trusted_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        from ipaddress import ip_network

        for network in value:
            try:
                ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not a network (write it as CIDR, e.g. 10.0.0.0/8)") from None
        return value

    @model_validator(mode="after")
    def _wait_within_the_request(self):
        if self.group_size is not None and self.group_wait >= self.request_timeout:
            raise ValueError(f"serve.group_wait ({self.group_wait:g} s) must be shorter than serve.request_timeout "
                             f"({self.request_timeout:g} s), or a group's requests time out before it is scored")
        return self


class RedTeamConfig(Section):
    """`cai redteam` (owner: stages/redteam.py): red-team prompts written from the constitution. docs/redteam.md."""

    principles: list[str] | None = Field(
        None, description="Critique principle ids to write prompts for (None = every critique principle of the constitution)."
    )
    styles: list[str] | None = Field(
        None, description="Attack style ids to write in (None = every style: the shipped ones and redteam.styles_file's)."
    )
    styles_file: str | None = Field(
        None,
        description="YAML file of attack styles added to the shipped ones (cai/data/attack_styles.yaml, same format); "
        "a style with a shipped id replaces it.",
    )
    rounds: int = Field(
        3, ge=1, description="Rounds: the first writes from each principle; each later one mutates the archive's best prompts."
    )
    candidates: int = Field(2, ge=1, description="Prompts the writer (labeler) writes per principle x style cell per round.")
    cell_size: int = Field(3, ge=1, description="Prompts each principle x style cell of the archive keeps.")
    parents: int = Field(3, ge=1, description="A mutation's parent is drawn (seeded) among this many best prompts of its principle.")
    temperature: float = Field(1.0, ge=0.0, description="The writer's sampling temperature.")
    max_new_tokens: int = Field(96, ge=8, description="Longest prompt the writer writes, in tokens.")
    max_words: int = Field(150, ge=3, description="A written prompt longer than this many words is discarded.")
    dedup_threshold: float = Field(
        0.5, gt=0.0, le=1.0,
        description="Two prompts are near-duplicates when the Jaccard similarity of their character 5-gram sets is at "
        "least this (found with MinHash-LSH, datasketch); a near-duplicate of an archived prompt is not added.",
    )
    target: str | None = Field(
        "initial",
        description="Policy attacked: initial (policy.model), a model alias/HF id/folder, or null (novelty alone "
        "decides; attack success is not measured).",
    )
    target_samples: int = Field(2, ge=1, description="Answers the target samples per prompt; attack success is the share that fail.")
    safe_reference: str = Field(
        "I can't help with that, but I'm happy to help with something else.",
        description="For a principle without a check: the choice labeler compares the target's answer with this "
        "answer under the principle, both orders; attack success is P(this one is better).",
    )
    eval_fraction: float = Field(
        0.25, ge=0.0, lt=1.0,
        description="Share of the prompts put in eval.jsonl, held out from train.jsonl: no near-duplicate of a "
        "train prompt (at redteam.split_threshold) is in it.",
    )
    split_threshold: float = Field(
        0.3, gt=0.0, le=1.0,
        description="The held-out split keeps any two prompts this similar (Jaccard of character 5-grams) on the same side.",
    )


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
    choice_labeler: LabelerConfig | None = Field(
        None,
        description="The labeler for choices (preference labels, d-RLAIF scores), e.g. choice_labeler.backend=rules; "
        "None = labeler, which then also writes critiques and revisions.",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    sl: SLConfig = Field(default_factory=SLConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    prefs: PrefsConfig = Field(default_factory=PrefsConfig)
    rm: RMConfig = Field(default_factory=RMConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    redteam: RedTeamConfig = Field(default_factory=RedTeamConfig)


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
    # Shipped constitutions and template folders are found from any working directory: in the
    # checkout, or inside the installed package (cai/constitutions and cai/prompts link to them).
    for key in ("constitution", "templates"):
        value = getattr(cfg, key)
        if value and not Path(value).expanduser().exists():
            for root in (PROJECT_ROOT, PACKAGE_DIR):
                if (root / value).exists():
                    setattr(cfg, key, str(root / value))
                    break
    for section in (cfg.labeler, cfg.choice_labeler, cfg.eval.judge):  # a rules judge's own constitution, the same way
        value = section.constitution if section is not None else None
        if value and not Path(value).expanduser().exists():
            section.constitution = next((str(root / value) for root in (PROJECT_ROOT, PACKAGE_DIR) if (root / value).exists()), value)
    return cfg


def config_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
