"""Stage 5, RL: PPO against the AI-feedback reward, with a KL penalty to the SL-CAI model.

Why cai owns its PPO: TRL moved its PPOTrainer to `trl.experimental` and removed it in 2026 (1.12.0 is
the last release that has it). PPO for language models is a short loop over a handful of formulas, so
cai keeps it here, written from the papers (Ziegler et al. 2019; Ouyang et al. 2022; Huang et al. 2024,
"The N Implementation Details of RLHF with PPO"), with every formula a pure, tested function in
`cai/rl/`. DPO, GRPO and RLOO are TRL's trainers, set up by config in `rl_trl.py` (`cai rl` runs that
module instead of this one when `rl.algorithm` is not ppo).

Models (cai/policy_models.py): the policy (from `sft/`), a frozen reference (the SFT model; with LoRA, the
policy with its adapter disabled: one copy of the weights), a value model (initialised from the reward
model when the reward is `rm/` and it shares the policy's tokenizer; with LoRA, a second adapter on the
same base plus a head) and the reward: `rm/`, the labeler's direct score, or a Python callable. What
trains keeps float32 master weights and computes in bf16 under autocast where `policy.dtype` says so
(accelerate's `mixed_precision`); the frozen reference is stored in bf16.

One PPO step, on every process:
 1. sample answers to a batch of rl-split prompts from exactly softmax(logits / temperature): no
    top-k/top-p, and every processor the model's generation_config would add switched off;
 2. truncate each answer after its first EOS;
 3. score the answers (answers that never end get `rl.unfinished_score`, -1 by default; scores are clipped);
    a reward model with several outputs is read as rl.* says (principles summed, ensemble members
    combined: mean, mean - coef x std or worst case); each of `rl.constraints` is mixed in by its Lagrange
    multiplier, which then moves with how far this batch is from its bound (Safe-RLHF); with
    `rl.group_baseline` (each prompt answered rl.group_size times) each score less its siblings' mean;
 4. old log-probs, reference log-probs (both from logits / temperature) and values from forward passes;
    per-token rewards: -beta * KL(policy || reference) on every token, the score on the last;
 5. values and GAE advantages and returns (without a value model, `rl.value_model=false`: each token's
    return is its advantage, and there is no value loss in 7);
 6. whiten the advantages;
 7. PPO epochs over shuffled minibatches: clipped policy loss + clipped value loss, gradient
    accumulation (gradients synchronised across processes on the last micro-batch only) and clipping;
 8. update the KL controller with the measured KL;
 9. log (rl/metrics.jsonl, accelerate's trackers) and check the reward-hacking monitors (among them the
    ensemble members' disagreement, which grows where the policy leaves the reward model's ground);
10. checkpoint every `rl.checkpoint_every` steps; a killed run resumes from the last checkpoint.
Then the final policy is saved to `rl/` (merged when LoRA, adapter in `rl/adapter/`) and answers a few
eval-split prompts for the report (`rl/samples.jsonl`).

Around the steps (cai/rounds.py, cai/selection.py):
- Rounds of AI feedback (`rl.rounds`): the steps are cut into rounds; before each round after the first,
  the current policy's answers are labeled by the choice labeler and the reward model is updated on every
  label so far; PPO goes on from the current policy, optimizer and value model, the KL penalty still to the
  SL-CAI model. A checkpoint and a snapshot are kept at the end of each round.
- Keeping the best snapshot (`rl.select_by=validation`): eval.judge scores every snapshot on the val split
  and the best is copied into `rl/`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import torch

from cai.chat import policy_input
from cai.config import Config
from cai.errors import CaiError
from cai.checks import refuses as is_refusal
from cai.models import mixed_precision, sampling_kwargs
from cai.policy_models import PPOReward, build_models, check_reward, load_reward_fn, sample_for_report
from cai.records import JsonlWriter, atomic_write_json, atomic_write_text, read_jsonl
from cai.rounds import check_rounds, ppo_round, round_at, round_bounds, round_ends, summarize_rounds
from cai.selection import check_selection, select_snapshot, selection_stale
from cai.rl import (
    AdaptiveKLController,
    FixedKLController,
    clip_rewards,
    distinct_token_ngrams,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty_per_token,
    leave_one_out,
    logprobs_from_logits,
    masked_whiten,
    pearson,
    policy_loss,
    returns_to_go,
    score_unfinished,
    shaped_rewards,
    truncate_after_eos,
    value_loss,
)
from cai.seeding import stable_seed
from cai.stages import Stage, open_stage, require_done, stage_dir
from cai.templates import Templates
from cai.training import check_tracker


# --------------------------------------------------------------------------------------------------
# Prompts, checks, checkpoints


def rl_prompts(cfg: Config, tokenizer) -> list[tuple[str, str, str]]:
    """(user text, chat prompt ready for the answer, kind) for the rl split, too-long prompts left out."""
    from cai.promptsets import split_prompts

    split = split_prompts(cfg.data, cfg.seed)["rl"]
    prompts = split["red_team"] + split["helpful"]
    if not prompts:
        raise CaiError("data: the rl split has no prompts; add prompts or raise data.fractions.rl")
    templates = Templates(cfg.templates)
    rows = [(p.text, tokenizer.apply_chat_template(policy_input(templates, p.text, cfg.policy.system_prompt), tokenize=False,
                                                   add_generation_prompt=True), p.kind) for p in prompts]
    kept = [r for r in rows if len(tokenizer(r[1], add_special_tokens=False).input_ids) <= cfg.rl.max_prompt_tokens]
    if not kept:
        raise CaiError(f"every rl prompt is longer than rl.max_prompt_tokens={cfg.rl.max_prompt_tokens}")
    if len(kept) < len(rows):
        print(f"[rl] {len(rows) - len(kept)} prompts longer than rl.max_prompt_tokens left out")
    return kept


def ppo_seed(cfg: Config) -> int:
    """rl.seed, else the run's seed: what PPO's sampling and batch order are drawn from."""
    return cfg.seed if cfg.rl.seed is None else cfg.rl.seed


def batch_for_step(prompts: list, step: int, global_batch: int, seed: int, group_size: int = 1) -> list:
    """The global batch of one step: the prompts in a seeded order, reshuffled on every pass; with
    group_size G, global_batch / G prompts, each repeated G times in a row (one group of answers each)."""
    n, orders, out = len(prompts), {}, []
    per_step = global_batch // group_size
    for k in range(step * per_step, (step + 1) * per_step):
        if k // n not in orders:
            generator = torch.Generator().manual_seed(stable_seed(seed, "rl-order", k // n))
            orders[k // n] = torch.randperm(n, generator=generator).tolist()
        out.extend([prompts[orders[k // n][k % n]]] * group_size)
    return out


def check_batch_sizes(cfg: Config) -> None:
    rl = cfg.rl
    if rl.batch_size % rl.minibatch_size:
        raise CaiError(f"rl.batch_size ({rl.batch_size}) must be a multiple of rl.minibatch_size ({rl.minibatch_size})")
    if rl.minibatch_size % rl.grad_accum:
        raise CaiError(f"rl.minibatch_size ({rl.minibatch_size}) must be a multiple of rl.grad_accum ({rl.grad_accum})")
    if rl.group_baseline and rl.batch_size % rl.group_size:
        raise CaiError(f"rl.group_baseline: rl.batch_size ({rl.batch_size}) must be a multiple of rl.group_size ({rl.group_size})")


class Progress:
    """The data position (steps done), checkpointed with the model, optimizer and KL controller."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if folder.exists() else []
    return found[-1] if found else None


def save_checkpoint(accelerator, folder: Path, step: int) -> None:
    """accelerate's save_state into a temporary folder, renamed into place; older ones removed."""
    tmp = folder / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp.rename(folder / f"step-{step}")
        for old in folder.glob("step-*"):
            if old.name != f"step-{step}":
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_snapshot(policy, tokenizer, folder: Path, step: int) -> None:
    """The policy's weights at `step` (merged when LoRA), written whole or not at all: rl/snapshots/step-N."""
    target, tmp = folder / f"step-{step}", folder / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(policy, "merge_and_unload"):  # LoRA: the adapter merged into a copy of the weights
        import copy

        policy = copy.deepcopy(policy).merge_and_unload(adapter_names=["default"])
    policy.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


# --------------------------------------------------------------------------------------------------
# One PPO step


def ppo_step(cfg, step, accelerator, model, reference, optimizer, kl_ctl, tokenizer, batch, reward: PPOReward) -> dict:
    rl, unwrapped, device = cfg.rl, accelerator.unwrap_model(model), accelerator.device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    micro = rl.minibatch_size // rl.grad_accum
    started = time.perf_counter()

    # 1. Sample answers from exactly softmax(logits / temperature): no top-k/top-p, and none of the
    #    penalties a model's generation_config would add (they would bias the old log-probs and the KL).
    query = tokenizer([b[1] for b in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    torch.manual_seed(stable_seed(ppo_seed(cfg), "rl-sample", step, accelerator.process_index))
    with torch.no_grad(), accelerator.autocast():
        output = unwrapped.policy.generate(
            **query, max_new_tokens=rl.max_new_tokens or cfg.policy.max_new_tokens, pad_token_id=pad_id,
            eos_token_id=eos_id, **sampling_kwargs(rl.temperature),
        )
    responses = output[:, query.input_ids.shape[1] :]

    # 2. Truncate after the first EOS; pad (distinct from EOS) after it; drop all-pad columns.
    responses, mask, ended = truncate_after_eos(responses, eos_id, pad_id)
    n = int(mask.any(dim=0).nonzero().max()) + 1
    responses, mask = responses[:, :n], mask[:, :n]
    input_ids = torch.cat([query.input_ids, responses], dim=1)
    attention_mask = torch.cat([query.attention_mask, mask.long()], dim=1)
    answer_tokens = [row[m].tolist() for row, m in zip(responses, mask)]
    answers = tokenizer.batch_decode(answer_tokens, skip_special_tokens=True)

    # 3. Score: the reward on the text (several outputs combined); unfinished answers get
    #    rl.unfinished_score; clip; the constraints mixed in by their multipliers, which then move.
    prompts, texts, kinds = [b[0] for b in batch], [a.strip() for a in answers], [b[2] for b in batch]
    scored = reward.score(prompts, texts, kinds)
    raw = scored.reward.to(device)
    scores = score_unfinished(raw, ended, rl.unfinished_score)
    if rl.reward_clip is not None:
        scores = clip_rewards(scores, rl.reward_clip)
    reward_logs = reward.logs(scored, prompts, kinds, accelerator.gather, device)
    if reward.constraints is not None:
        scores, constraint_logs = reward.constraints.step(scores, prompts, texts, kinds, scored.principles, accelerator.gather, device)
        reward_logs.update(constraint_logs)
    # With rl.group_baseline, each answer scored against its siblings' (the batch holds whole groups);
    # `scores` itself is what the log reports.
    relative = leave_one_out(scores, rl.group_size) if rl.group_baseline else scores

    # 4. Old log-probs, entropy and values from the forward pass the PPO epochs repeat (so the first
    #    ratio is 1 whatever the sampler's numerics), reference log-probs; all from logits / temperature.
    #    Per-token KL and rewards.
    logprobs, ref_logprobs, values, entropies = [], [], [], []
    with torch.no_grad():
        for rows in torch.arange(len(batch)).split(micro):
            logits, value = model(input_ids[rows], attention_mask[rows], n)
            logprobs.append(logprobs_from_logits(logits, responses[rows], rl.temperature))
            entropies.append(entropy_from_logits(logits, mask[rows], rl.temperature) * mask[rows].sum())
            ref_logits = unwrapped.reference_logits(reference, input_ids[rows], attention_mask[rows], n)
            ref_logprobs.append(logprobs_from_logits(ref_logits, responses[rows], rl.temperature))
            values.append(value)
            del logits, ref_logits
    logprobs, ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)
    values = torch.cat(values) if rl.value_model else None
    entropy = torch.stack(entropies).sum() / mask.sum()
    kl = kl_penalty_per_token(logprobs, ref_logprobs, mask, rl.kl_estimator)
    rewards = shaped_rewards(relative, kl, mask, kl_ctl.value)
    if rl.whiten_rewards and mask.sum() > 1:
        rewards = masked_whiten(rewards, mask, shift_mean=False)

    # 5. Values and GAE; without a value model, the returns themselves.
    if rl.value_model:
        advantages, returns = gae(rewards, values, mask, rl.gamma, rl.lam)
    else:
        advantages = returns = returns_to_go(rewards, mask, rl.gamma)

    # 6. Whiten the advantages.
    if mask.sum() > 1:
        advantages = masked_whiten(advantages, mask)

    # 7. PPO epochs over shuffled minibatches, with gradient accumulation and clipping.
    stats = {k: [] for k in ("policy_loss", "clip_frac", "approx_kl") + (("value_loss", "value_clip_frac") if rl.value_model else ())}
    shuffle = torch.Generator().manual_seed(stable_seed(ppo_seed(cfg), "rl-minibatch", step, accelerator.process_index))
    for _ in range(rl.ppo_epochs):
        for minibatch in torch.randperm(len(batch), generator=shuffle).split(rl.minibatch_size):
            micro_batches = minibatch.split(micro)
            for i, rows in enumerate(micro_batches):
                # Under DDP, gradients are averaged across processes once, after the last micro-batch.
                last = i == len(micro_batches) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    logits, value = model(input_ids[rows], attention_mask[rows], n)
                    new_logprobs = logprobs_from_logits(logits, responses[rows], rl.temperature)
                    pg = policy_loss(new_logprobs, logprobs[rows], advantages[rows], mask[rows], rl.clip_eps)
                    loss, measured = pg.loss, {"policy_loss": pg.loss, "clip_frac": pg.clip_fraction, "approx_kl": pg.approx_kl}
                    if rl.value_model:
                        vf = value_loss(value, values[rows], returns[rows], mask[rows], rl.value_clip_eps)
                        loss = loss + rl.vf_coef * vf.loss
                        measured.update(value_loss=vf.loss, value_clip_frac=vf.clip_fraction)
                    accelerator.backward(loss / rl.grad_accum)
                for key, v in measured.items():
                    stats[key].append(float(v.detach()))
            if rl.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), rl.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    # 8. Update the KL controller with the KL measured on every process's batch.
    gathered = accelerator.gather(torch.stack([scores, kl.sum(1), mask.sum(1).float(), raw], dim=1))
    mean_kl = float(gathered[:, 1].mean())
    beta = kl_ctl.value
    kl_ctl.update(mean_kl, n_steps=gathered.shape[0])

    # 9. Metrics and the reward-hacking monitors, over every process's batch.
    from accelerate.utils import gather_object

    local = {k: sum(v) / len(v) for k, v in stats.items()} | {"entropy": float(entropy)}
    if rl.value_model:
        local["explained_variance"] = explained_variance(values, returns, mask)
    means = dict(zip(local, accelerator.reduce(torch.tensor(list(local.values()), device=device), reduction="mean").tolist()))
    texts = gather_object([(kind, answer) for (_, _, kind), answer in zip(batch, answers)])
    helpful = [answer for kind, answer in texts if kind == "helpful"]
    tokens_all = gather_object(answer_tokens)
    metrics = {
        "step": step + 1,
        "reward_mean": float(gathered[:, 0].mean()),
        "reward_std": float(gathered[:, 0].std()) if len(gathered) > 1 else 0.0,
        "raw_score_mean": float(gathered[:, 3].mean()),
        "kl": mean_kl,
        "kl_coef": beta,
        # without a value model its entries are None
        **{k: means.get(k) for k in ("policy_loss", "value_loss", "clip_frac", "value_clip_frac", "approx_kl", "entropy",
                                     "explained_variance")},
        "answer_length": float(gathered[:, 2].mean()),
        "ended_frac": float(accelerator.gather(ended.float()).mean()),
        "length_reward_corr": pearson(gathered[:, 0].cpu(), gathered[:, 2].cpu()),
        "distinct_2": distinct_token_ngrams(tokens_all, 2),
        # over-refusal is the usual way a harmlessness reward is hacked; counted as eval's refusal markers are
        "refusal_rate_helpful": sum(map(is_refusal, helpful)) / len(helpful) if helpful else 0.0,
        **reward_logs,
        "episodes": int(gathered.shape[0]),
        "seconds": time.perf_counter() - started,
    }
    metrics["tokens_per_second"] = float(gathered[:, 2].sum()) / metrics["seconds"]
    metrics["warnings"] = monitor_warnings(cfg, metrics)
    return metrics


def step_extras(m: dict) -> str:
    """The console line's tail: the ensemble's disagreement, each constraint as measured, its bound and multiplier."""
    parts = []
    if "reward_disagreement" in m:
        parts.append(f"disagreement {m['reward_disagreement']:.3f}")
    for key in (k for k in m if k.startswith("multiplier/")):
        name = key.split("/", 1)[1]
        measured = m.get(f"constraint/{name}")
        parts.append(f"{name} {'n/a' if measured is None else format(measured, '.2f')} (bound {m[f'bound/{name}']:g}, "
                     f"lambda {m[key]:.3f})")
    return "".join(f" | {p}" for p in parts)


def monitor_warnings(cfg: Config, m: dict) -> list[str]:
    rl, out = cfg.rl, []
    if m["length_reward_corr"] > rl.max_length_corr:
        out.append(f"corr(reward, length) = {m['length_reward_corr']:.2f} > rl.max_length_corr {rl.max_length_corr}: the reward may favour length")
    if m["distinct_2"] < rl.min_distinct_2:
        out.append(f"distinct-2 = {m['distinct_2']:.2f} < rl.min_distinct_2 {rl.min_distinct_2}: answers repeat themselves")
    if m["refusal_rate_helpful"] > rl.max_refusal_rate:
        out.append(f"refusal rate on helpful prompts = {m['refusal_rate_helpful']:.2f} > rl.max_refusal_rate {rl.max_refusal_rate}")
    if m.get("reward_disagreement_ratio", 0.0) > rl.max_disagreement:
        out.append(f"the reward ensemble's members disagree {m['reward_disagreement_ratio']:.1f}x as much as on the SFT model's "
                   f"answers (> rl.max_disagreement {rl.max_disagreement:g}): the policy is where the reward model has not been")
    if rl.unfinished_score is not None and m["ended_frac"] < 0.5:
        # Every cut answer scores the same penalty: with most answers cut, the reward carries little signal.
        out.append(f"only {m['ended_frac']:.0%} of answers ended within {rl.max_new_tokens or cfg.policy.max_new_tokens} "
                   f"tokens; the others all scored rl.unfinished_score={rl.unfinished_score:g}: raise rl.max_new_tokens "
                   f"or set rl.unfinished_score=null")
    return out


# --------------------------------------------------------------------------------------------------
# The stage


def run(cfg: Config) -> Path:
    if cfg.rl.algorithm != "ppo":
        raise CaiError(f"rl.algorithm={cfg.rl.algorithm} runs in cai.stages.rl_trl (`cai rl` picks it)")
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    from cai.models import default_device, load_tokenizer

    # Checks before anything is written: earlier stages, batch sizes, pad vs EOS, prompts.
    sft_dir = require_done(cfg, "sft", "rl")
    check_reward(cfg)
    check_batch_sizes(cfg)
    check_tracker(cfg.rl.log_with)
    check_rounds(cfg)
    if cfg.rl.select_by == "validation" and not cfg.rl.keep_snapshots and cfg.rl.rounds == 1:
        raise CaiError("rl.select_by=validation chooses among snapshots: set rl.keep_snapshots=true (or rl.rounds > 1)")
    check_selection(cfg)
    tokenizer = load_tokenizer(str(sft_dir), cfg.cache_dir)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise CaiError(f"{sft_dir}: the tokenizer pads with EOS; PPO needs a pad token distinct from EOS")
    # cpu=True without CUDA: `accelerate launch --multi_gpu --num_processes N` then runs N CPU processes (gloo).
    # mixed_precision: float32 master weights, bf16 compute under autocast where policy.dtype says so.
    # An earlier stage of `cai run` in this process may have set another (transformers' TrainingArguments
    # resets this state the same way; the distributed state is kept).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    settings = dict(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(cfg.policy.dtype, default_device()),
                    project_dir=str(stage_dir(cfg, "rl")))
    accelerator = Accelerator(**settings, log_with=None if cfg.rl.log_with == "none" else cfg.rl.log_with)
    if accelerator.num_processes > 1 and cfg.rl.rounds > 1:
        raise CaiError("rl.rounds > 1 labels and trains the reward model between rounds in one process; "
                       "run it without accelerate launch (or with --num_processes 1)")
    prompts = rl_prompts(cfg, tokenizer)

    labelers = (("choices",) if cfg.rl.reward == "direct" or cfg.rl.rounds > 1 else ()) + (("judge",) if cfg.rl.select_by == "validation" else ())
    holder: list[Stage | None] = [open_stage(cfg, "rl", uses_labeler=labelers) if accelerator.is_main_process else None]
    accelerator.wait_for_everyone()
    stage = broadcast_object_list(holder)[0]
    if stage.done:
        if accelerator.is_main_process and selection_stale(cfg, stage.path):  # eval.judge changed since it chose
            print("[rl] eval.judge changed since the snapshot was chosen: choosing again")
            select_snapshot(cfg, stage.path)
        return stage.path

    # Models, optimizer, KL controller; the reward.
    reward_fn, rm_dir = load_reward_fn(cfg, accelerator.device)
    model, reference = build_models(cfg, sft_dir, rm_dir, accelerator.device)
    fused = accelerator.device.type in ("cpu", "cuda")  # one kernel for all parameters: several times faster
    # No weight decay (Huang et al. 2024; TRL): decay would pull the policy toward zero, not toward the reference.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.rl.learning_rate, eps=1e-5,
                                  weight_decay=0.0, fused=fused)
    model, optimizer = accelerator.prepare(model, optimizer)
    rl = cfg.rl
    kl_ctl = AdaptiveKLController(rl.kl_coef, rl.target_kl, rl.kl_horizon) if rl.adaptive_kl else FixedKLController(rl.kl_coef)
    progress = Progress()
    reward = PPOReward(cfg, reward_fn)  # several outputs combined; rl.constraints and their multipliers
    accelerator.register_for_checkpointing(kl_ctl, progress, *([reward.constraints] if reward.constraints else []))

    # Resume from the last checkpoint; the metrics of steps after it are dropped (they are redone).
    checkpoints = stage.path / "checkpoints"
    last = latest_checkpoint(checkpoints)
    if last is not None:
        accelerator.load_state(str(last))
        print(f"[rl] resumed from {last.name}: step {progress.step}, kl_coef {kl_ctl.value:.4g}")
    metrics_path = stage.path / "metrics.jsonl"
    if accelerator.is_main_process:
        kept = [r for r in read_jsonl(metrics_path, repair=True) if r["step"] <= progress.step]
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    if rl.log_with != "none":
        accelerator.init_trackers("cai-rl", config={k: v for k, v in rl.model_dump().items() if v is not None})

    global_batch = rl.batch_size * accelerator.num_processes
    history = read_jsonl(metrics_path) if accelerator.is_main_process else []
    bounds, current_round = round_bounds(rl.steps, rl.rounds), 1

    def next_round(k: int) -> tuple:
        """A round of AI feedback: the current policy's pairs labeled, the reward model updated (done once;
        a finished round's reward model is read). Its training (TRL's trainer) resets accelerate's
        process-wide state; PPO's is set back after. (The reward function, PPO's reading of it with the
        constraints and their multipliers carried on.)"""
        fn = ppo_round(cfg, stage.path, stage.fingerprint, k, accelerator.unwrap_model(model).policy, tokenizer,
                       lambda folder: load_reward_fn(cfg, accelerator.device, folder)[0])
        restore_accelerate_state(settings)
        updated = PPOReward(cfg, fn)
        updated.constraints = reward.constraints  # the object accelerate checkpoints
        return fn, updated

    if round_at(bounds, min(progress.step, rl.steps - 1)) > 1:  # resumed in a later round
        current_round = round_at(bounds, min(progress.step, rl.steps - 1))
        reward_fn, reward = next_round(current_round)
    with JsonlWriter(metrics_path) if accelerator.is_main_process else contextlib.nullcontext() as writer:
        while progress.step < rl.steps:
            step = progress.step
            if round_at(bounds, step) != current_round:
                current_round = round_at(bounds, step)
                reward_fn, reward = next_round(current_round)
            rows = batch_for_step(prompts, step, global_batch, ppo_seed(cfg), rl.group_size if rl.group_baseline else 1)
            rank = accelerator.process_index
            m = ppo_step(cfg, step, accelerator, model, reference, optimizer, kl_ctl, tokenizer,
                         rows[rank * rl.batch_size : (rank + 1) * rl.batch_size], reward)
            progress.step = step + 1

            # 9. Log.
            accelerator.log({k: v for k, v in m.items() if k not in ("step", "warnings") and v is not None}, step=m["step"])
            if accelerator.is_main_process:
                writer.write(m)
                history.append(m)
                print(f"[rl] step {m['step']}/{rl.steps} reward {m['reward_mean']:+.3f}±{m['reward_std']:.3f} "
                      f"kl {m['kl']:.3f} beta {m['kl_coef']:.4f} entropy {m['entropy']:.2f} "
                      f"clip {m['clip_frac']:.2f} "
                      + (f"vf {m['value_loss']:.3f} ev {m['explained_variance']:+.2f} " if m["value_loss"] is not None else "")
                      + f"len {m['answer_length']:.1f} ({m['seconds']:.1f}s)" + step_extras(m))
                for warning in m["warnings"]:
                    print(f"[rl] warning: step {m['step']}: {warning}")

            # 10. Checkpoint; with rl.keep_snapshots, the policy at this step is kept for the eval's
            # over-optimisation curve (rl/snapshots/step-N). The end of a round is always both: the next
            # round's feedback resumes from it, and eval scores each round. With rl.select_by=validation the
            # final policy is both too: it is a candidate, and a kill while choosing resumes there.
            ends, last = round_ends(bounds), progress.step == rl.steps
            if (progress.step % rl.checkpoint_every == 0 or progress.step in ends) and not last or last and rl.select_by == "validation":
                save_checkpoint(accelerator, checkpoints, progress.step)
                if accelerator.is_main_process and (rl.keep_snapshots or progress.step in ends or last):
                    save_snapshot(accelerator.unwrap_model(model).policy, tokenizer, stage.path / "snapshots", progress.step)

    # Every rank must hold the same weights: record a checksum per process.
    unwrapped = accelerator.unwrap_model(model)
    checksum = sum(float(p.detach().double().abs().sum()) for p in unwrapped.parameters() if p.requires_grad)
    checksums = [float(x) for x in accelerator.gather(torch.tensor([checksum], dtype=torch.float64, device=accelerator.device))]
    summary = None
    if accelerator.is_main_process:
        summary = save_and_report(cfg, stage, unwrapped.policy, tokenizer, reward_fn, history, kl_ctl, checksums, bounds)
    accelerator.wait_for_everyone()  # no process leaves while the main one still saves
    accelerator.end_training()
    if torch.distributed.is_initialized():
        # The process group must die by destroy_process_group, whose handle releases the GIL while gloo's
        # threads are joined. The DDP model's reducer holds the group too, and accelerate and a reference
        # cycle keep the model alive past `del`: when the garbage collector freed it at exit, the reducer
        # joined those threads holding the GIL while one of them needed it to free a finished collective's
        # tensors, and the process hung (seen once in a test on CPU, torch 2.13). So the model goes first.
        model, optimizer = accelerator.free_memory(model, optimizer)  # and collects the garbage
        torch.distributed.destroy_process_group()
    if summary is None:
        return stage.path
    kept = ""
    if rl.select_by == "validation":  # the main process alone, the process group gone
        selection = select_snapshot(cfg, stage.path)
        kept = f", kept {selection['kept']}"
        if selection["step"] != rl.steps:  # rl/ now holds an earlier snapshot: its answers for the report
            shutil.rmtree(stage.path / "adapter", ignore_errors=True)  # the final policy's (merged, it is in snapshots/)
            from cai.models import load_causal_lm

            sample_for_report(cfg, load_causal_lm(str(stage.path), cfg.cache_dir, dtype=torch.float32), tokenizer, reward_fn, stage.path)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return stage.finish(f"{rl.steps} PPO steps, reward {summary['reward_first']:+.3f} -> {summary['reward_last']:+.3f}, "
                        f"KL {summary['kl_trajectory'][-1]:.3f}{kept}")


def restore_accelerate_state(settings: dict) -> None:
    """Set accelerate's process-wide state back to PPO's after a TRL trainer reset it to its own (its
    gradient accumulation, or a `sync_gradients` left false, would silently change PPO's steps)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    Accelerator(**settings)


def reward_trajectories(history: list[dict]) -> dict:
    """The ensemble's disagreement, and each constraint's bound, measure and multiplier, step by step."""
    out: dict = {}
    if "reward_disagreement" in history[-1]:
        out["disagreement_trajectory"] = [round(h["reward_disagreement"], 4) for h in history]
    names = [k.split("/", 1)[1] for k in history[-1] if k.startswith("multiplier/")]
    if names:
        out["constraints"] = {name: {"bound": history[-1][f"bound/{name}"],
                                     "measured": [h.get(f"constraint/{name}") for h in history],
                                     "multiplier": [round(h[f"multiplier/{name}"], 4) for h in history]} for name in names}
    return out


def save_and_report(cfg, stage, policy, tokenizer, reward_fn, history, kl_ctl, checksums, bounds) -> dict:
    """Save the final policy (merged when LoRA, the adapter too), sample from it, write metrics.json."""
    if cfg.rl.lora:
        policy.save_pretrained(str(stage.path / "adapter"), selected_adapters=["default"])
        policy = policy.merge_and_unload(adapter_names=["default"])
    policy.save_pretrained(str(stage.path))
    tokenizer.save_pretrained(str(stage.path))
    summary = {
        "algorithm": "ppo",
        "steps": cfg.rl.steps,
        "processes": len(checksums),
        "reward_first": history[0]["reward_mean"],
        "reward_last": history[-1]["reward_mean"],
        "reward_trajectory": [round(h["reward_mean"], 4) for h in history],
        "kl_trajectory": [round(h["kl"], 4) for h in history],
        "kl_coef_final": kl_ctl.value,
        "samples": sample_for_report(cfg, policy, tokenizer, reward_fn, stage.path),
        "rank_param_checksums": checksums,
        "warnings": sum(len(h["warnings"]) for h in history),
        **reward_trajectories(history),
    }
    if cfg.rl.rounds > 1:
        summary["rounds"] = summarize_rounds(stage.path, bounds, history)
        atomic_write_json(stage.path / "rounds.json", summary["rounds"])
    atomic_write_json(stage.path / "metrics.json", summary)
    print("[rl] reward trajectory: " + " ".join(f"{x:+.2f}" for x in summary["reward_trajectory"]))
    print("[rl] KL trajectory:     " + " ".join(f"{x:.2f}" for x in summary["kl_trajectory"]))
    return summary
