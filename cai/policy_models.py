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
  `(prompts, answers) -> list[float]` named `module.path:function`. PPO reads it through `PPOReward`:
  a reward model with several outputs (ensemble members, principles) is combined as `rl.ensemble_reward`
  and `rl.principle_*` say, and `rl.constraints` are mixed in by their Lagrange multipliers.
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
from typing import NamedTuple

import torch

from cai.chat import policy_input
from cai.config import Config
from cai.errors import CaiError
from cai.checks import refuses
from cai.stage_state import require_done

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
    """Before anything is written: rm/ exists when it is the reward, a callable imports, the reward's
    combination and constraints name principles and checks that exist."""
    check_reward_reading(cfg)
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

# --------------------------------------------------------------------------------------------------
# How PPO reads the reward: several outputs combined, constraints mixed in (rl.ensemble_reward,
# rl.principle_weights, rl.principle_combine, rl.constraints)


def _reward_layout(cfg: Config) -> dict:
    """The outputs the rm stage makes under this config (members, principles)."""
    principles = None
    if cfg.rm.per_principle:
        from cai.constitution import load_constitution

        principles = [c.id for c in load_constitution(cfg.constitution).comparisons]
    return {"members": cfg.rm.ensemble, "principles": principles}


def check_reward_reading(cfg: Config) -> None:
    """One line, before any model loads, when rl.* asks of the reward what it cannot give."""
    from cai.checks import compile_check
    from cai.constitution import load_constitution

    rl = cfg.rl
    from_rm = rl.reward == "rm" and rl.algorithm == "ppo"
    layout = _reward_layout(cfg) if from_rm else {"members": 1, "principles": None}
    if rl.ensemble_reward != "mean" and layout["members"] < 2:
        raise CaiError(f"rl.ensemble_reward={rl.ensemble_reward} needs an ensemble reward model: rl.reward=rm with rm.ensemble > 1 (PPO)")
    if rl.principle_weights or rl.principle_combine != "weighted_sum":
        if not layout["principles"]:
            raise CaiError("rl.principle_weights and rl.principle_combine need a reward with one output per principle: "
                           "rl.reward=rm with rm.per_principle=true (PPO)")
        unknown = sorted(set(rl.principle_weights) - set(layout["principles"]))
        if unknown:
            raise CaiError(f"rl.principle_weights: {unknown[0]!r} is not a comparison principle of {cfg.constitution} "
                           f"(they are: {', '.join(layout['principles'])})")
    if rl.constraints and rl.algorithm != "ppo":
        raise CaiError(f"rl.constraints apply to PPO; rl.algorithm={rl.algorithm} does not read them")
    constitution = None
    for n, c in enumerate(rl.constraints):
        where = f"rl.constraints[{n}]"
        if c.principle is not None:
            if not layout["principles"] or c.principle not in layout["principles"]:
                raise CaiError(f"{where}.principle={c.principle!r} needs a reward model with an output for it: rl.reward=rm, "
                               f"rm.per_principle=true, and a comparison principle of that id in {cfg.constitution}")
        elif isinstance(c.check, str):
            constitution = constitution or load_constitution(cfg.constitution)
            carriers = [p for p in [*constitution.comparisons, *constitution.critiques] if p.id == c.check and p.check is not None]
            if not carriers:
                raise CaiError(f"{where}.check={c.check!r}: no principle of {cfg.constitution} with that id carries a check")
        else:
            try:
                compile_check(c.check)
            except ValueError as err:
                raise CaiError(f"{where}.check: {err}") from None
    labels = [c.label for c in rl.constraints]
    if len(set(labels)) < len(labels):
        raise CaiError(f"rl.constraints: two constraints are named {sorted(x for x in labels if labels.count(x) > 1)[0]!r}; give each a name")


class ScoredBatch(NamedTuple):
    """What the reward says about one batch of B answers."""

    reward: torch.Tensor  # [B] what PPO optimises, before unfinished_score, clipping and the constraints
    principles: torch.Tensor | None  # [B, P] each principle's normalised reward (the members' mean), or None
    disagreement: torch.Tensor | None  # [B] the ensemble members' std (of their mean over principles), or None


def principle_applies(checks: list, prompts: list[str], kinds: list[str]) -> torch.Tensor:
    """[B, P] whether each principle bears on each answer's prompt: its check's `when`, if it carries a check."""
    return torch.tensor([[check is None or check.applies_to(p, k) for check in checks] for p, k in zip(prompts, kinds)], dtype=torch.bool)


class PPOReward:
    """The reward as PPO reads it: a plain reward's scores, or a reward model's outputs combined (principles
    by rl.principle_weights / rl.principle_combine, then members by rl.ensemble_reward), and the constraints."""

    def __init__(self, cfg: Config, reward_fn: RewardFn):
        from cai.checks import compile_check
        from cai.constitution import load_constitution

        self.fn, rl = reward_fn, cfg.rl
        self.members = getattr(reward_fn, "members", 1)
        self.principles = getattr(reward_fn, "principles", None)
        self.how, self.coef, self.normalize = rl.ensemble_reward, rl.uncertainty_coef, rl.principle_combine == "normalized_sum"
        self.baseline_disagreement = getattr(reward_fn, "baseline_disagreement", None)
        self.several = hasattr(reward_fn, "outputs") and self.members * len(self.principles or [None]) > 1
        self.checks: list = []
        self.weights = torch.ones(1)
        if self.principles:
            constitution = load_constitution(cfg.constitution)
            carried = {p.id: p.check for p in constitution.comparisons}
            self.checks = [compile_check(carried[p]) if carried.get(p) is not None else None for p in self.principles]
            named = rl.principle_weights
            self.weights = torch.tensor([named.get(p, 0.0) if named else 1.0 / len(self.principles) for p in self.principles])
        self.constraints = Constraints(cfg, self.principles) if rl.constraints else None

    def score(self, prompts: list[str], answers: list[str], kinds: list[str]) -> ScoredBatch:
        if not self.several:
            return ScoredBatch(score(self.fn, prompts, answers), None, None)
        from cai.rl import combine_members, combine_principles, member_disagreement

        outputs = self.fn.outputs(prompts, answers).float()  # [B, K, P]
        if not bool(torch.isfinite(outputs).all()):
            raise CaiError("the reward model returned a non-finite score")
        applies = principle_applies(self.checks, prompts, kinds) if self.principles else None
        per_member = combine_principles(outputs, self.weights, applies, normalize=self.normalize) if self.principles else outputs[:, :, 0]
        reward = combine_members(per_member, self.how, self.coef)
        principles = outputs.mean(dim=1) if self.principles else None
        disagreement = member_disagreement(outputs.mean(dim=2)) if self.members > 1 else None
        return ScoredBatch(reward, principles, disagreement)

    def logs(self, scored: ScoredBatch, prompts: list[str], kinds: list[str], gather, device) -> dict:
        """This batch's per-principle rewards and the members' disagreement, over every process's answers
        (`gather`: accelerate's, which wants tensors on `device`)."""
        out: dict = {}
        if scored.disagreement is not None:
            mean = float(gather(scored.disagreement.to(device)).mean())
            out["reward_disagreement"] = mean
            if self.baseline_disagreement:
                out["reward_disagreement_ratio"] = mean / self.baseline_disagreement
        if scored.principles is not None:
            applies = principle_applies(self.checks, prompts, kinds)
            values, where = gather(scored.principles.to(device)), gather(applies.to(device))
            from cai.rl import constraint_means

            means, _ = constraint_means(values, where)
            for principle, m in zip(self.principles, means.tolist()):
                out[f"principle_reward/{principle}"] = None if m != m else m
        return out


def reward_as_ppo_reads_it(cfg: Config, reward_fn: RewardFn):
    """(prompts, answers, kinds) -> [float]: a reward model's scores as PPO reads them (PPOReward.score): a
    per-principle model's outputs where each principle applies, by rl.principle_weights; an ensemble's
    members by rl.ensemble_reward; a plain reward model's normalised score. The constraints' terms are left
    out. What the eval stage reports and `cai stress` compares, so that neither judges another reward."""
    combined = PPOReward(cfg, reward_fn)
    return lambda prompts, answers, kinds: combined.score(prompts, answers, kinds).reward.tolist()


class Constraints:
    """rl.constraints: each constraint's value per answer and where it applies, and its Lagrange multiplier,
    which moves once per batch (cai.rl.update_multipliers) and is checkpointed with the run (state_dict).

    Values are oriented so that higher is better: an `at_most` constraint is held as -value >= -bound."""

    def __init__(self, cfg: Config, principles: list[str] | None):
        from cai.checks import compile_check
        from cai.constitution import load_constitution
        from cai.rl import LagrangeState

        self.specs = list(cfg.rl.constraints)
        constitution = load_constitution(cfg.constitution) if any(isinstance(c.check, str) for c in self.specs) else None
        self.sources = []  # ("check", Check) or ("principle", index)
        for c in self.specs:
            if c.principle is not None:
                self.sources.append(("principle", principles.index(c.principle)))
            elif isinstance(c.check, str):
                carrier = next(p for p in [*constitution.comparisons, *constitution.critiques] if p.id == c.check and p.check is not None)
                self.sources.append(("check", compile_check(carrier.check)))
            else:
                self.sources.append(("check", compile_check(c.check)))
        self.sign = torch.tensor([1.0 if c.at_least is not None else -1.0 for c in self.specs])
        self.bounds = self.sign * torch.tensor([c.at_least if c.at_least is not None else c.at_most for c in self.specs])
        self.lr = torch.tensor([c.lr for c in self.specs])
        self.state = LagrangeState(torch.tensor([c.multiplier for c in self.specs]))

    @property
    def names(self) -> list[str]:
        return [c.label for c in self.specs]

    def measure(self, prompts: list[str], answers: list[str], kinds: list[str], principles: torch.Tensor | None):
        """(values [B, C] oriented, applies [B, C] bool) of this batch."""
        values = torch.zeros(len(answers), len(self.specs))
        applies = torch.zeros(len(answers), len(self.specs), dtype=torch.bool)
        for j, (spec, (source, what)) in enumerate(zip(self.specs, self.sources)):
            for b, (prompt, answer, kind) in enumerate(zip(prompts, answers, kinds)):
                if spec.kind is not None and kind != spec.kind:
                    continue
                if source == "principle":
                    value = float(principles[b, what])
                else:
                    value = what.score(prompt, answer, kind)
                    if value is None:  # the check's own `when` leaves this prompt out
                        continue
                values[b, j], applies[b, j] = value, True
        return values * self.sign, applies

    def step(self, scores: torch.Tensor, prompts, answers, kinds, principles, gather, device) -> tuple[torch.Tensor, dict]:
        """The scores with the constraints mixed in by the current multipliers; then each multiplier moves by
        this batch's measure over every process (`gather`, on `device`). Returns (mixed scores [B], log entries)."""
        from cai.rl import LagrangeState, constraint_means, lagrangian_mix, update_multipliers

        values, applies = self.measure(prompts, answers, kinds, principles)
        used = self.state.multipliers.clone()
        mixed = lagrangian_mix(scores, values.to(scores.device), applies.to(scores.device), used.to(scores.device))
        measured, counts = constraint_means(gather(values.to(device)).cpu(), gather(applies.to(device)).cpu())
        self.state = update_multipliers(LagrangeState(used), measured, self.bounds, self.lr)
        logs = {}
        for j, name in enumerate(self.names):
            m = float(measured[j])
            logs[f"constraint/{name}"] = None if m != m else m * float(self.sign[j])  # as written: the check's score
            spec = self.specs[j]
            logs[f"bound/{name}"] = spec.at_least if spec.at_least is not None else spec.at_most
            logs[f"multiplier/{name}"] = float(used[j])
            logs[f"constraint_answers/{name}"] = int(counts[j])
        return mixed, logs

    def state_dict(self) -> dict:
        return {"multipliers": self.state.multipliers.tolist(), "names": self.names}

    def load_state_dict(self, state: dict) -> None:
        from cai.rl import LagrangeState

        self.state = LagrangeState(torch.tensor(state["multipliers"], dtype=torch.float32))


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
    the states before them [B, n] (None without a value model: `value_head` None). With LoRA, `policy` is a
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
        if self.value_head is None:
            return logits, None
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
    if not isinstance(head, torch.nn.Linear):
        raise CaiError(f"rm/: cannot find a linear score head on {type(seq_cls_model).__name__}")
    return head


def value_from_reward_model(rm_dir: Path, device) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """Backbone and head of rm/ in float32 (they train), the head rescaled so that it predicts
    normalised scores (Huang et al. 2024: initialise the value model from the reward model). With several
    outputs, the head predicts the reward model's score (the normalised mean of its outputs); with LoRA
    members, it is member 0's backbone and the mean of its outputs."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from cai.models import without_dropout
    from cai.rewards import load_reward_model, read_outputs

    layout = read_outputs(rm_dir)
    if layout["share"] == "lora" and layout["members"] * len(layout["principles"] or [None]) > 1:
        rm = load_reward_model(rm_dir, layout).member(0).float()
    else:
        config = AutoConfig.from_pretrained(rm_dir)
        without_dropout(config)
        rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, config=config, dtype=torch.float32)
    norm_path = rm_dir / "normalization.json"
    norm = json.loads(norm_path.read_text()) if norm_path.exists() else {"mean": 0.0, "std": 1.0}
    old = _score_head(rm)
    head = torch.nn.Linear(old.in_features, 1, bias=True, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(old.weight.mean(dim=0, keepdim=True) / norm["std"])
        bias = old.bias.mean() if old.bias is not None else torch.zeros(())
        head.bias.copy_(((bias - norm["mean"]) / norm["std"]).reshape(1))
    return _no_dropout(getattr(rm, rm.base_model_prefix)).to(device), head.to(device)


def same_vocabulary(folder_a, folder_b) -> bool:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder_a).get_vocab() == AutoTokenizer.from_pretrained(folder_b).get_vocab()


def zero_value_head(hidden: int, device) -> torch.nn.Linear:
    head = torch.nn.Linear(hidden, 1, dtype=torch.float32, device=device)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    return head


def build_models(cfg: Config, sft_dir: Path, rm_dir: Path | None, device):
    """(PolicyAndValue, reference or None) on `device`, dropout off everywhere; with rl.value_model=false
    the PolicyAndValue has no value model (nothing loaded or trained for it).

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
        if cfg.rl.value_model:
            policy.add_adapter("value", lora())
        for name, param in policy.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()  # both adapters train (in float32), the base stays frozen
            param.requires_grad_("lora_" in name)
        module = PolicyAndValue(policy, None, zero_value_head(hidden, device) if cfg.rl.value_model else None, lora=True)
        module.use_adapter("default")
        print("[rl] LoRA: the reference is the policy with its adapter disabled"
              + ("; the value model is a second adapter" if cfg.rl.value_model else "; no value model"))
        return module.eval(), None
    policy = load_causal_lm(str(sft_dir), cfg.cache_dir, dtype=torch.float32, device=device)
    hidden = policy.config.get_text_config().hidden_size
    reference = load_causal_lm(str(sft_dir), cfg.cache_dir, dtype=compute_dtype, device=device).requires_grad_(False)
    if not cfg.rl.value_model:
        print("[rl] no value model (rl.value_model=false): advantages are the whitened returns")
        return PolicyAndValue(policy, None, None, lora=False).eval(), reference
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
                          "refusal": refuses(answer)})
    return len(prompts)
