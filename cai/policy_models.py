"""The rl stage's models and reward: what PPO trains, what it compares against, what scores it, and
what the trained policy answers for the report. Shared by rl.py (PPO) and rl_trl.py (DPO, GRPO, RLOO),
so it lives below the stages.

- The policy is the SFT model. Without LoRA the reference is a second, frozen copy of it; with LoRA
  the reference is the policy with its adapter disabled (one copy of the weights).
- The value model is initialised from the reward model when the reward is `rm/` and it shares the
  policy's tokenizer (Huang et al. 2024), its head rescaled to predict normalised scores; otherwise from
  the SFT model with a zero head. With LoRA it is a second adapter ("value") on the policy's own base,
  plus its head.
- The reward is `rm/` (cai.rewards.RewardModelScorer: normalised scores, re-tokenized text, so a reward
  model with another tokenizer works), the labeler's direct score, or any callable
  `(prompts, answers) -> list[float]` named `module.path:function`.
- Precision: what trains (the policy, the value model and its head, LoRA adapters) keeps float32
  master weights; bf16/fp16 is the compute precision, applied by accelerate's autocast
  (`mixed_precision`). Frozen weights (the reference, a LoRA base) are stored in the compute dtype.
Every model has dropout off and stays in eval mode.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from cai.chat import policy_input
from cai.config import Config
from cai.errors import CaiError
from cai.labelers.parsing import is_refusal
from cai.stages import require_done

RewardFn = Callable[[list[str], list[str]], list[float]]


# --------------------------------------------------------------------------------------------------
# The reward


def reward_callable(name: str) -> RewardFn:
    """The function named `module.path:function`, or one line saying what is wrong with the name."""
    if ":" not in name:
        raise CaiError(f"rl.reward={name!r}: use rm, direct, or module.path:function")
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise CaiError(f"rl.reward={name!r}: cannot import it ({err})") from None
    if not callable(fn):
        raise CaiError(f"rl.reward={name!r} is not callable")
    return fn


def check_reward(cfg: Config) -> None:
    """Before anything is written: rm/ exists when it is the reward, a callable imports."""
    if cfg.rl.reward == "rm":
        require_done(cfg, "rm", "rl with rl.reward=rm")
    elif cfg.rl.reward == "direct":  # the rating template renders before any model loads
        from cai.chat import conversation
        from cai.templates import Templates

        Templates(cfg.templates).render("score.jinja", conversation=conversation("x"), response="y", principles=["p"])
    else:
        reward_callable(cfg.rl.reward)


def load_reward_fn(cfg: Config, device, rm_dir: Path | None = None) -> tuple[RewardFn, Path | None]:
    """The reward named by `rl.reward`, and the rm/ folder when it is the reward model (`rm_dir` names
    another reward-model folder than the rm stage's: a round's update, rl/rounds/round-K/rm)."""
    name = cfg.rl.reward
    if name == "rm":
        rm_dir = rm_dir or require_done(cfg, "rm", "rl with rl.reward=rm")
        from cai.rewards import RewardModelScorer

        return RewardModelScorer(rm_dir, cfg.cache_dir, device=device), rm_dir
    if name == "direct":
        from cai.constitution import load_constitution
        from cai.labelers import build_labeler
        from cai.rewards import DirectLabelerReward
        from cai.templates import Templates

        labeler = build_labeler(cfg, role="choices")
        return DirectLabelerReward(labeler, load_constitution(cfg.constitution), Templates(cfg.templates), cfg), None
    return reward_callable(name), None

def score(reward_fn: RewardFn, prompts: list[str], answers: list[str]) -> torch.Tensor:
    values = list(reward_fn(prompts, answers))
    if len(values) != len(answers):
        raise CaiError(f"the reward returned {len(values)} scores for {len(answers)} answers")
    scores = torch.tensor([float(v) for v in values], dtype=torch.float32)
    if not bool(torch.isfinite(scores).all()):
        raise CaiError(f"the reward returned a non-finite score: {values}")
    return scores


# --------------------------------------------------------------------------------------------------
# The models


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as `generate` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _backbone(causal_lm):
    """The transformer under a causal LM's head (peft-wrapped or not): hidden states, no logits."""
    base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    return getattr(base, base.base_model_prefix)


class PolicyAndValue(torch.nn.Module):
    """What PPO trains, as one module so that accelerate wraps (DDP) and checkpoints it as one.

    `forward` returns the policy logits that predicted the last `n` tokens [B, n, V] and the values of
    the states before them [B, n]. With LoRA, `policy` is a
    peft model with two adapters, "default" (the policy) and "value", on one base; the value pass runs
    the base with the value adapter.
    """

    def __init__(self, policy, value_backbone, value_head: torch.nn.Linear, lora: bool):
        super().__init__()
        self.policy, self.value_backbone, self.value_head, self.lora = policy, value_backbone, value_head, lora
        self._lora_layers = None

    def use_adapter(self, name: str) -> None:
        """Route every LoRA layer through adapter `name`. (peft's set_adapter would also freeze the other
        adapter and walk the whole model at every call; here both adapters train, only the route changes.)"""
        if self._lora_layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._lora_layers = [m for m in self.policy.modules() if isinstance(m, BaseTunerLayer)]
        for layer in self._lora_layers:
            layer._active_adapter = name

    def forward(self, input_ids, attention_mask, n: int):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask))
        logits = self.policy(**kwargs, logits_to_keep=n + 1, use_cache=False).logits[:, :-1]
        if self.lora:
            self.use_adapter("value")
            hidden = _backbone(self.policy)(**kwargs, use_cache=False).last_hidden_state
            self.use_adapter("default")
        else:
            hidden = self.value_backbone(**kwargs, use_cache=False).last_hidden_state
        values = self.value_head(hidden[:, -n - 1 : -1]).squeeze(-1).float()
        return logits, values

    @torch.no_grad()
    def reference_logits(self, reference, input_ids, attention_mask, n: int):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask))
        if self.lora:
            with self.policy.disable_adapter():
                logits = self.policy(**kwargs, logits_to_keep=n + 1, use_cache=False).logits[:, :-1]
            for name, param in self.policy.named_parameters():  # re-enabling froze the inactive adapter
                param.requires_grad_("lora_" in name)
            return logits
        return reference(**kwargs, logits_to_keep=n + 1, use_cache=False).logits[:, :-1]


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.eval()


def _score_head(seq_cls_model) -> torch.nn.Linear:
    head = getattr(seq_cls_model, "score", None) or getattr(seq_cls_model, "classifier", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise CaiError(f"rm/: cannot find a 1-output linear score head on {type(seq_cls_model).__name__}")
    return head


def value_from_reward_model(rm_dir: Path, device) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """Backbone and head of rm/ in float32 (they train), the head rescaled so that it predicts
    normalised scores (Huang et al. 2024: initialise the value model from the reward model)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from cai.models import without_dropout

    config = AutoConfig.from_pretrained(rm_dir)
    without_dropout(config)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, config=config, dtype=torch.float32)
    norm_path = rm_dir / "normalization.json"
    norm = json.loads(norm_path.read_text()) if norm_path.exists() else {"mean": 0.0, "std": 1.0}
    old = _score_head(rm)
    head = torch.nn.Linear(old.in_features, 1, bias=True, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(old.weight / norm["std"])
        bias = old.bias if old.bias is not None else torch.zeros(1)
        head.bias.copy_((bias - norm["mean"]) / norm["std"])
    return _no_dropout(getattr(rm, rm.base_model_prefix)).to(device), head.to(device)


def same_vocabulary(folder_a, folder_b) -> bool:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder_a).get_vocab() == AutoTokenizer.from_pretrained(folder_b).get_vocab()


def zero_value_head(hidden: int, device) -> torch.nn.Linear:
    head = torch.nn.Linear(hidden, 1, dtype=torch.float32, device=device)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    return head


def build_models(cfg: Config, sft_dir: Path, rm_dir: Path | None, device):
    """(PolicyAndValue, reference or None) on `device`, dropout off everywhere.

    What trains is float32 (master weights; the compute precision `policy.dtype` names is applied by
    accelerate's autocast); what is frozen (the reference, a LoRA base) is stored in that precision.
    """
    from transformers import AutoModel

    from cai.models import load_causal_lm, resolve_dtype, without_dropout

    compute_dtype = resolve_dtype(cfg.policy.dtype, torch.device(device))
    if cfg.rl.lora:
        from peft import LoraConfig, get_peft_model

        def lora():
            return LoraConfig(r=cfg.rl.lora_r, lora_alpha=cfg.rl.lora_alpha, lora_dropout=0.0,
                              target_modules="all-linear", task_type="CAUSAL_LM")

        # The base is frozen: stored in the compute dtype. peft keeps the adapters float32.
        policy = load_causal_lm(str(sft_dir), cfg.cache_dir, dtype=compute_dtype, device=device)
        hidden = policy.config.get_text_config().hidden_size
        policy = get_peft_model(policy, lora(), autocast_adapter_dtype=True)
        policy.add_adapter("value", lora())
        for name, param in policy.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()  # both adapters train (in float32), the base stays frozen
            param.requires_grad_("lora_" in name)
        module = PolicyAndValue(policy, None, zero_value_head(hidden, device), lora=True)
        module.use_adapter("default")
        print("[rl] LoRA: the reference is the policy with its adapter disabled; the value model is a second adapter")
        return module.eval(), None
    policy = load_causal_lm(str(sft_dir), cfg.cache_dir, dtype=torch.float32, device=device)
    hidden = policy.config.get_text_config().hidden_size
    reference = load_causal_lm(str(sft_dir), cfg.cache_dir, dtype=compute_dtype, device=device).requires_grad_(False)
    if rm_dir is not None and same_vocabulary(rm_dir, sft_dir):
        backbone, head = value_from_reward_model(rm_dir, device)
        print("[rl] value model initialised from rm/")
    else:
        if rm_dir is not None:
            print("[rl] rm/ has another tokenizer: the reward re-tokenizes text; the value model starts from sft/")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(sft_dir)
        without_dropout(config)
        backbone = _no_dropout(AutoModel.from_pretrained(sft_dir, config=config, dtype=torch.float32)).to(device)
        head = zero_value_head(hidden, device)
    return PolicyAndValue(policy, backbone, head, lora=False).eval(), reference


# --------------------------------------------------------------------------------------------------
# What the trained policy answers, for the report

def sample_for_report(cfg: Config, policy, tokenizer, reward_fn: RewardFn | None, folder: Path) -> int:
    """The final policy answers a few eval-split prompts; each answer is scored -> rl/samples.jsonl."""
    from cai.labelers import GenerateRequest
    from cai.labelers.local import LocalGenerator
    from cai.promptsets import split_prompts
    from cai.records import JsonlWriter
    from cai.templates import Templates

    split = split_prompts(cfg.data, cfg.seed)["eval"]
    prompts = (split["red_team"] + split["helpful"])[: cfg.rl.samples]
    if not prompts:
        return 0
    policy.eval()
    generator = LocalGenerator(policy, tokenizer, cfg.policy.batch_size, cfg.seed, cfg.policy.system_prompt)
    templates = Templates(cfg.templates)
    requests = [GenerateRequest(policy_input(templates, p.text, cfg.policy.system_prompt), max_new_tokens=cfg.rl.max_new_tokens or cfg.policy.max_new_tokens,
                                temperature=cfg.rl.temperature, top_p=1.0) for p in prompts]
    answers = [g.text or "" for g in generator.generate(requests)]
    rewards = score(reward_fn, [p.text for p in prompts], answers).tolist() if reward_fn else [None] * len(answers)
    (folder / "samples.jsonl").unlink(missing_ok=True)
    with JsonlWriter(folder / "samples.jsonl") as writer:
        for p, answer, r in zip(prompts, answers, rewards):
            writer.write({"id": p.id, "kind": p.kind, "prompt": p.text, "answer": answer, "reward": r,
                          "refusal": is_refusal(answer)})
    return len(prompts)
