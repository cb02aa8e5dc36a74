"""The rl stage on tiny models.

PPO raises a scripted reward with the measured KL near its target (adaptive controller on and off); a
run killed with SIGKILL resumes from its last checkpoint and ends exactly where an uninterrupted run
ends; with LoRA the reference is the policy with its adapter disabled; the value model starts from the
reward model; DPO, GRPO and RLOO run; bad inputs fail in one line before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cai.cli import run_stage
from cai.config import load_config, to_yaml
from cai.errors import CaiError
from cai.records import mark_done, read_jsonl
from cai.policy_models import build_models
from cai.stages import rl, stage_fingerprint
from tests.conftest import ROOT

# --------------------------------------------------------------------------------------------------
# Scripted rewards, named in configs as tests.test_rl_stage:<function>


def letter_e_reward(prompts: list[str], answers: list[str]) -> list[float]:
    """10 x the share of the answer's characters that are the letter 'e': dense, and easy to hack."""
    return [10.0 * answer.count("e") / max(len(answer), 1) for answer in answers]


def slow_letter_e_reward(prompts: list[str], answers: list[str]) -> list[float]:
    time.sleep(0.3)  # so that a kill lands in the middle of the run
    return letter_e_reward(prompts, answers)


SEEN_PROMPTS: list[str] = []


def recording_reward(prompts: list[str], answers: list[str]) -> list[float]:
    """Remembers the prompts it was asked to score; 0 for every answer."""
    SEEN_PROMPTS.extend(prompts)
    return [0.0] * len(answers)


def prompt_parity_reward(prompts: list[str], answers: list[str]) -> list[float]:
    """Depends on the prompt only: a value model can predict it exactly."""
    return [2.0 * (len(p) % 2) for p in prompts]


def wrong_count_reward(prompts: list[str], answers: list[str]) -> list[float]:
    return [0.0]


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rl_config(tiny_config, tiny_model_dir):
    """tiny_config with sft/ in place (the tiny model) and a scripted reward."""

    def make(*overrides: str):
        cfg = tiny_config("rl.reward=tests.test_rl_stage:letter_e_reward", *overrides)
        sft_dir = Path(cfg.output_dir) / "sft"
        if not (sft_dir / "DONE").exists():
            shutil.copytree(tiny_model_dir, sft_dir)
            mark_done(sft_dir, stage_fingerprint(cfg, "sft"))  # as if made under this config
        return cfg

    return make


def save_tiny_reward_model(cfg, mean: float = 0.5, std: float = 2.0, extra_token: bool = False) -> Path:
    """A random tiny reward model in the rm/ layout: seq-classification (1 label), tokenizer,
    normalization.json, DONE. `extra_token` gives it a tokenizer that differs from the policy's."""
    from transformers import LlamaForSequenceClassification

    from tests.tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    if extra_token:
        tokenizer.add_tokens(["<|extra|>"])
    config = make_tiny_model(tokenizer, seed=1).config
    config.num_labels = 1
    folder = Path(cfg.output_dir) / "rm"
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "normalization.json").write_text(json.dumps({"mean": mean, "std": std}))
    mark_done(folder, stage_fingerprint(cfg, "rm"))
    return folder


def with_shipped_sampling_defaults(cfg):
    """cfg, its sft/ replaced by a tiny model whose generation_config sets a repetition penalty, top-k, min-p..."""
    from tests.tiny import save_tiny_model_with_sampling_defaults

    sft_dir = Path(cfg.output_dir) / "sft"
    shutil.rmtree(sft_dir)
    save_tiny_model_with_sampling_defaults(sft_dir)
    mark_done(sft_dir, stage_fingerprint(cfg, "sft"))
    return cfg


def run_rl(cfg):
    """The rl stage as `cai rl` runs it: rl.py for ppo, rl_trl.py for dpo, grpo and rloo."""
    return run_stage("rl", cfg)


def metrics(cfg) -> list[dict]:
    return read_jsonl(Path(cfg.output_dir) / "rl" / "metrics.jsonl")


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


# --------------------------------------------------------------------------------------------------
# It learns


# No tiny-model answer ends within 8 tokens: the default penalty for cut answers would hide the reward.
LEARNING = ("rl.steps=50", "rl.batch_size=16", "rl.minibatch_size=8", "rl.ppo_epochs=4", "rl.learning_rate=1e-3",
            "rl.samples=0", "rl.unfinished_score=null")


def reward_and_kl(history: list[dict]) -> tuple[float, float, float]:
    """(mean reward of the first 5 steps, of the last 10, mean KL of the last 10)."""
    first = statistics.mean(m["reward_mean"] for m in history[:5])
    last = statistics.mean(m["reward_mean"] for m in history[-10:])
    return first, last, statistics.mean(m["kl"] for m in history[-10:])


def test_ppo_raises_the_reward_with_the_kl_near_its_target_adaptive(rl_config, capsys):
    cfg = rl_config(*LEARNING, "rl.adaptive_kl=true", "rl.kl_coef=0.3", "rl.target_kl=4", "rl.kl_horizon=64")
    run_rl(cfg)
    history = metrics(cfg)
    first, last, kl = reward_and_kl(history)
    with capsys.disabled():
        print(f"adaptive: reward {first:.2f} -> {last:.2f}, KL(last 10) {kl:.2f} vs target 4, "
              f"beta {history[0]['kl_coef']:.3f} -> {history[-1]['kl_coef']:.3f}", file=sys.stderr)
    assert last > first + 0.5
    assert 2.0 <= kl <= 8.0
    assert history[-1]["kl_coef"] != pytest.approx(0.3)  # the controller moved beta
    out = capsys.readouterr().out
    assert "[rl] reward trajectory:" in out and "[rl] KL trajectory:" in out


def test_ppo_raises_the_reward_with_a_fixed_kl_coefficient(rl_config):
    cfg = rl_config(*LEARNING, "rl.adaptive_kl=false", "rl.kl_coef=0.1")
    run_rl(cfg)
    history = metrics(cfg)
    first, last, kl = reward_and_kl(history)
    print(f"fixed: reward {first:.2f} -> {last:.2f}, KL(last 10) {kl:.2f}", file=sys.stderr)
    assert last > first + 0.5
    assert kl <= 8.0
    assert {m["kl_coef"] for m in history} == {0.1}


def test_without_a_value_model_ppo_raises_the_reward_and_trains_no_critic(rl_config, capsys):
    cfg = rl_config(*LEARNING, "rl.adaptive_kl=false", "rl.kl_coef=0.1", "rl.value_model=false")
    model, _ = build_models(cfg, Path(cfg.output_dir) / "sft", None, "cpu")
    assert model.value_head is None and model.value_backbone is None
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.policy.parameters())
    run_rl(cfg)
    history = metrics(cfg)
    first, last, kl = reward_and_kl(history)
    print(f"no value model: reward {first:.2f} -> {last:.2f}, KL(last 10) {kl:.2f}", file=sys.stderr)
    assert last > first + 0.5 and kl <= 8.0
    assert all(m["value_loss"] is None and m["explained_variance"] is None and m["policy_loss"] is not None for m in history)
    assert "no value model" in capsys.readouterr().out


def test_value_model_false_belongs_to_ppo_and_its_default_leaves_older_runs_current(tiny_config):
    from cai.stage_state import fingerprint_parts

    with pytest.raises(CaiError, match="rl.value_model=false applies to ppo"):
        tiny_config("rl.algorithm=grpo", "rl.value_model=false")
    assert "value_model" not in fingerprint_parts(tiny_config(), "rl")["rl"]
    assert stage_fingerprint(tiny_config(), "eval") != stage_fingerprint(tiny_config("rl.value_model=false"), "eval")


def test_value_model_learns_a_predictable_reward(rl_config):
    cfg = rl_config("rl.reward=tests.test_rl_stage:prompt_parity_reward", "rl.steps=15", "rl.batch_size=16",
                    "rl.minibatch_size=8", "rl.ppo_epochs=4", "rl.learning_rate=1e-3", "rl.samples=0",
                    "rl.unfinished_score=null")
    run_rl(cfg)
    history = metrics(cfg)
    assert history[0]["explained_variance"] < 0.2 and history[-1]["explained_variance"] > 0.9
    assert history[-1]["value_loss"] < 0.1 * history[0]["value_loss"]


# --------------------------------------------------------------------------------------------------
# What every step logs; what the stage leaves


def test_a_run_logs_every_metric_warns_and_saves_the_policy(rl_config, tiny_model_dir, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(rl, "is_refusal", lambda answer: True)  # every helpful answer "refuses"
    cfg = rl_config("rl.steps=2", "rl.batch_size=4", "rl.minibatch_size=2", "rl.grad_accum=2",
                    "rl.learning_rate=1e-2", "rl.max_refusal_rate=0.5", "rl.samples=3", "rl.unfinished_score=-1")
    out = run_rl(cfg)
    history = metrics(cfg)
    assert [m["step"] for m in history] == [1, 2]
    for key in ("reward_mean", "reward_std", "kl", "kl_coef", "entropy", "clip_frac", "approx_kl", "value_loss",
                "explained_variance", "answer_length", "length_reward_corr", "distinct_2", "refusal_rate_helpful"):
        assert all(isinstance(m[key], float) for m in history), key
    assert abs(history[0]["kl"]) < 1e-4  # the policy is the reference until the first update
    # No tiny-model answer ends within 8 tokens: each gets rl.unfinished_score.
    assert all(m["ended_frac"] == 0.0 and m["reward_mean"] == -1.0 for m in history)
    assert all(m["refusal_rate_helpful"] == 1.0 and m["warnings"] for m in history)
    assert "[rl] warning: step 1: refusal rate on helpful prompts = 1.00 > rl.max_refusal_rate 0.5" in capsys.readouterr().out
    assert (out / "DONE").exists() and not (out / "checkpoints").exists()
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["processes"] == 1 and len(summary["reward_trajectory"]) == 2
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 3 and all(isinstance(s["reward"], float) for s in samples)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert run_rl(cfg) == out and "already complete" in capsys.readouterr().out


def test_old_log_probs_are_a_forward_pass_at_the_temperature_whatever_the_generation_config(rl_config, tmp_path, monkeypatch):
    """A model whose generation_config sets a repetition penalty, top-k, min-p...: the old log-probs PPO
    records are those of softmax(logits / T) (the first ratio is 1), and the answers are drawn from it."""
    from tests.test_models import assert_drawn_from_tempered_logits, record_generate

    cfg = with_shipped_sampling_defaults(rl_config("rl.steps=1", "rl.batch_size=4", "rl.minibatch_size=4", "rl.ppo_epochs=1",
                                                   "rl.temperature=0.7", "rl.max_new_tokens=12", "rl.samples=0"))
    first_minibatch = []
    real_policy_loss = rl.policy_loss

    def recording_policy_loss(new_logprobs, old_logprobs, advantages, mask, clip_eps):
        first_minibatch.append((new_logprobs.detach(), old_logprobs, mask))
        return real_policy_loss(new_logprobs, old_logprobs, advantages, mask, clip_eps)

    monkeypatch.setattr(rl, "policy_loss", recording_policy_loss)
    generated = record_generate(monkeypatch)
    run_rl(cfg)
    new, old, mask = first_minibatch[0]  # before any update: a forward pass of the sampling policy
    assert mask.sum() > 10
    torch.testing.assert_close(old[mask], new[mask], rtol=0, atol=1e-5)
    assert_drawn_from_tempered_logits(generated[0], 0.7)


def test_monitors_and_refusal_heuristic():
    assert rl.is_refusal("I'm sorry, but I can\u2019t help with that.")
    assert rl.is_refusal("As an AI, I cannot do this")
    assert not rl.is_refusal("Sure! Mix flour, water and yeast.")
    cfg = load_config(None, ["rl.max_length_corr=0.5", "rl.min_distinct_2=0.3", "rl.max_refusal_rate=0.2"])
    calm = {"length_reward_corr": 0.1, "distinct_2": 0.9, "refusal_rate_helpful": 0.0, "ended_frac": 0.9}
    assert rl.monitor_warnings(cfg, calm) == []
    hacked = {"length_reward_corr": 0.8, "distinct_2": 0.1, "refusal_rate_helpful": 0.5, "ended_frac": 0.2}
    assert len(rl.monitor_warnings(cfg, hacked)) == 4
    # cut answers scored as they are (rl.unfinished_score=null): no penalty to warn about
    assert len(rl.monitor_warnings(cfg.model_copy(update={"rl": cfg.rl.model_copy(update={"unfinished_score": None})}), hacked)) == 3


def test_batches_cover_every_prompt_and_do_not_depend_on_where_a_run_resumed():
    prompts = list(range(10))
    batches = [rl.batch_for_step(prompts, step, 5, seed=0) for step in range(4)]
    assert sorted(batches[0] + batches[1]) == prompts and sorted(batches[2] + batches[3]) == prompts
    assert batches[0] + batches[1] != batches[2] + batches[3]  # reshuffled on every pass
    assert rl.batch_for_step(prompts, 3, 5, seed=0) == batches[3]


def test_a_grouped_batch_holds_whole_groups_of_one_prompt_in_the_same_order():
    prompts = list(range(10))
    plain = [rl.batch_for_step(prompts, step, 2, seed=0) for step in range(5)]
    grouped = [rl.batch_for_step(prompts, step, 6, seed=0, group_size=3) for step in range(5)]
    assert all(len(b) == 6 for b in grouped)
    assert [[b[0]] * 3 + [b[1]] * 3 for b in plain] == grouped  # each step's prompts, each answered 3 times in a row


@pytest.mark.parametrize("grouped", [False, True])
def test_with_a_group_baseline_a_reward_that_only_tells_prompts_apart_teaches_nothing(rl_config, monkeypatch, grouped):
    # prompt_parity_reward scores every answer to a prompt alike: against its siblings each answer scores 0,
    # so the score PPO shapes is 0 throughout; without groups the prompts' differences reach it. The log
    # reports the reward's own scores either way.
    seen = []
    shaped = rl.shaped_rewards

    def recording(score, *args):
        seen.append(score.clone())
        return shaped(score, *args)

    monkeypatch.setattr(rl, "shaped_rewards", recording)
    cfg = rl_config("rl.reward=tests.test_rl_stage:prompt_parity_reward", "rl.steps=2", "rl.batch_size=4",
                    "rl.minibatch_size=2", "rl.group_size=2", f"rl.group_baseline={str(grouped).lower()}",
                    "rl.unfinished_score=null", "rl.samples=0")
    run_rl(cfg)
    scores = torch.cat(seen)
    assert len(scores) == 8
    assert bool((scores == 0).all()) == grouped
    assert any(m["reward_mean"] > 0 for m in metrics(cfg))  # the reward's own scores (0 or 2 each)


def test_group_baseline_belongs_to_ppo(tiny_config):
    with pytest.raises(CaiError, match="rl.group_baseline applies to ppo"):
        tiny_config("rl.algorithm=rloo", "rl.group_baseline=true")


# --------------------------------------------------------------------------------------------------
# Models: dropout, LoRA reference, value from the reward model


def test_every_model_has_dropout_off(rl_config):
    cfg = rl_config()
    sft_dir = Path(cfg.output_dir) / "sft"
    model, reference = build_models(cfg, sft_dir, None, "cpu")
    for m in (model, reference):
        assert not any(isinstance(x, torch.nn.Dropout) and x.p > 0 for x in m.modules())
        assert not any(x.training for x in m.modules())
    assert model.policy.config.attention_dropout == 0.0


def test_lora_reference_is_the_policy_with_its_adapter_disabled(rl_config):
    from transformers import AutoModelForCausalLM

    cfg = rl_config("rl.lora=true", "rl.lora_r=4")
    sft_dir = Path(cfg.output_dir) / "sft"
    model, reference = build_models(cfg, sft_dir, None, "cpu")
    sft = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    assert reference is None  # one copy of the weights: base + two small adapters + a value head
    assert sum(p.numel() for p in model.parameters()) < 1.3 * sum(p.numel() for p in sft.parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # move the policy (and the value adapter) away from the SFT model
        model.value_head.weight.normal_()
        ids = torch.randint(3, 500, (2, 12))
        mask = torch.ones_like(ids)
        logits, values = model(ids, mask, 5)
        ref_logits = model.reference_logits(None, ids, mask, 5)
        expected = sft(input_ids=ids, attention_mask=mask).logits[:, -6:-1]
    assert logits.shape == ref_logits.shape == expected.shape and values.shape == (2, 5)
    torch.testing.assert_close(ref_logits, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, expected, atol=1e-2)
    # Both adapters and the value head train; the base does not.
    logits, values = model(ids, mask, 5)
    (logits.float().mean() + values.mean()).backward()
    grads = {name: param.grad for name, param in model.named_parameters() if param.requires_grad}
    assert any(".default." in n for n in grads) and any(".value." in n for n in grads) and "value_head.weight" in grads
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n or "value_head" in n)
    assert all("lora_" in n or "value_head" in n for n in grads)


@pytest.mark.parametrize("value_model", [True, False])
def test_lora_run_saves_the_merged_policy_and_the_adapter(rl_config, tiny_model_dir, value_model):
    from transformers import AutoModelForCausalLM

    cfg = rl_config("rl.lora=true", "rl.lora_r=4", "rl.steps=2", "rl.batch_size=4", "rl.minibatch_size=2",
                    "rl.learning_rate=1e-2", "rl.samples=0", "rl.unfinished_score=null", f"rl.value_model={str(value_model).lower()}")
    model, _ = build_models(cfg, Path(cfg.output_dir) / "sft", None, "cpu")
    assert set(model.policy.peft_config) == ({"default", "value"} if value_model else {"default"})
    out = run_rl(cfg)
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(before[k], v) for k, v in merged.state_dict().items())


def test_value_model_starts_from_the_reward_model_with_normalised_scores(rl_config, capsys):
    from transformers import AutoModelForSequenceClassification

    cfg = rl_config()
    rm_dir = save_tiny_reward_model(cfg, mean=0.5, std=2.0)
    model, _ = build_models(cfg, Path(cfg.output_dir) / "sft", rm_dir, "cpu")
    assert "value model initialised from rm/" in capsys.readouterr().out
    rm_model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    ids = torch.randint(3, 500, (2, 10))
    with torch.no_grad():
        raw = rm_model(input_ids=ids).logits[:, 0]
        # The value of the state after the whole sequence: append any token and read the value before it.
        _, values = model(torch.cat([ids, ids[:, :1]], dim=1), torch.ones(2, 11, dtype=torch.long), 1)
    torch.testing.assert_close(values[:, 0], (raw - 0.5) / 2.0, rtol=1e-4, atol=1e-4)


def test_a_reward_model_with_another_tokenizer_is_read_as_text(rl_config, capsys):
    cfg = rl_config()
    rm_dir = save_tiny_reward_model(cfg, extra_token=True)
    model, _ = build_models(cfg, Path(cfg.output_dir) / "sft", rm_dir, "cpu")
    assert "rm/ has another tokenizer" in capsys.readouterr().out
    assert torch.count_nonzero(model.value_head.weight) == 0  # a fresh value head on the SFT model


def test_ppo_with_the_reward_model_as_reward(rl_config, capsys):
    cfg = rl_config("rl.reward=rm", "rl.steps=2", "rl.batch_size=4", "rl.minibatch_size=2", "rl.samples=2")
    save_tiny_reward_model(cfg)
    out = run_rl(cfg)
    assert "value model initialised from rm/" in capsys.readouterr().out
    assert len(metrics(cfg)) == 2 and (out / "DONE").exists()


# --------------------------------------------------------------------------------------------------
# Resume after SIGKILL


def test_a_run_killed_with_sigkill_resumes_and_ends_like_an_uninterrupted_one(rl_config, tmp_path, capsys):
    from safetensors.torch import load_file

    common = ("rl.steps=6", "rl.batch_size=4", "rl.minibatch_size=2", "rl.checkpoint_every=2",
              "rl.learning_rate=1e-2", "rl.kl_horizon=10", "rl.samples=0", "rl.unfinished_score=null")
    reference_cfg = rl_config(*common, f"output_dir={tmp_path / 'reference'}")
    run_rl(reference_cfg)

    cfg = rl_config(*common, "rl.reward=tests.test_rl_stage:slow_letter_e_reward")
    config_file = tmp_path / "rl.yaml"
    config_file.write_text(to_yaml(cfg))
    run_dir = Path(cfg.output_dir) / "rl"
    process = subprocess.Popen([sys.executable, "-m", "cai", "rl", str(config_file)], cwd=ROOT, env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "step-4").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "DONE").exists()

    run_rl(load_config(config_file))
    assert "resumed from step-4: step 4" in capsys.readouterr().out
    resumed, expected = metrics(cfg), metrics(reference_cfg)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for key in ("reward_mean", "kl", "kl_coef", "value_loss"):
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in expected], rel=1e-5, abs=1e-6), key
    weights = load_file(run_dir / "model.safetensors")
    for name, tensor in load_file(Path(reference_cfg.output_dir) / "rl" / "model.safetensors").items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# DPO, GRPO, RLOO


def save_preferences(cfg, label_probs: list[float]) -> None:
    import datasets

    from cai.records import save_dataset

    folder = Path(cfg.output_dir) / "prefs"
    n = len(label_probs)
    save_dataset(datasets.Dataset.from_dict({
        "prompt": [[{"role": "user", "content": f"How do I bake bread? ({i})"}] for i in range(n)],
        "chosen": [[{"role": "assistant", "content": "Mix flour, water, salt and yeast, then bake it."}]] * n,
        "rejected": [[{"role": "assistant", "content": "I am sorry, but I cannot help with that."}]] * n,
        "label_prob": label_probs,
    }), folder / "dataset")
    mark_done(folder, stage_fingerprint(cfg, "prefs"))


def test_dpo_uses_label_prob_as_filter_and_label_smoothing(rl_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = rl_config("rl.algorithm=dpo", "rl.steps=2", "rl.batch_size=2", "rl.learning_rate=1e-2",
                    "rl.dpo_min_label_prob=0.65", "rl.samples=2")
    save_preferences(cfg, [0.9, 0.8, 0.3, 0.6] * 2)  # 0.3 is flipped to 0.7; 0.6 is dropped
    out = run_rl(cfg)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["pairs"] == 6 and summary["label_smoothing"] == pytest.approx(0.2)
    assert summary["loss"] == "exo_pair"
    assert summary["steps"] == 2 and len(read_jsonl(out / "samples.jsonl")) == 2
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_grpo_and_rloo_train_on_the_reward_with_a_kl_penalty(rl_config, algorithm):
    cfg = rl_config(f"rl.algorithm={algorithm}", "rl.steps=2", "rl.batch_size=4", "rl.group_size=2",
                    "rl.ppo_epochs=1", "rl.learning_rate=1e-2", "rl.kl_coef=0.1", "rl.samples=2")
    out = run_rl(cfg)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["algorithm"] == algorithm and summary["steps"] == 2
    assert all("reward" in entry for entry in summary["log"])
    assert any(entry.get("kl", 0.0) > 0 for entry in summary["log"])  # the reference is in the loss
    assert all(isinstance(s["reward"], float) for s in read_jsonl(out / "samples.jsonl"))


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_grpo_and_rloo_rewards_read_the_users_request_not_the_policys_template(rl_config, algorithm, tmp_path):
    # TRL hands a reward the prompt as the policy read it: the user turn answer.jinja made of the request.
    # A reward model puts the request into that template itself and the checks find its kind by it, so
    # the reward must get the request, as PPO's does; with an edited answer.jinja the two differ.
    from cai.promptsets import split_prompts

    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "answer.jinja").write_text("Answer in one short paragraph.\n\n{{ prompt }}\n")
    cfg = rl_config(f"rl.algorithm={algorithm}", "rl.reward=tests.test_rl_stage:recording_reward", "rl.steps=1",
                    "rl.batch_size=4", "rl.group_size=2", "rl.samples=0", f"templates={templates}")
    SEEN_PROMPTS.clear()
    run_rl(cfg)
    split = split_prompts(cfg.data, cfg.seed)["rl"]
    requests = {p.text for kind in split.values() for p in kind}
    assert len(SEEN_PROMPTS) == 4 and set(SEEN_PROMPTS) <= requests


# --------------------------------------------------------------------------------------------------
# Bad input: one line, nothing written


def test_a_missing_rm_names_the_stage_that_makes_it(rl_config):
    cfg = rl_config("rl.reward=rm")
    with pytest.raises(CaiError, match=r"rm stage .*run `cai rm CONFIG` first"):
        run_rl(cfg)
    assert not (Path(cfg.output_dir) / "rl").exists()


def test_a_missing_sft_names_the_stage_that_makes_it(tiny_config):
    with pytest.raises(CaiError, match="sft stage"):
        run_rl(tiny_config())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("rl.batch_size=6", "rl.minibatch_size=4"), r"rl.batch_size \(6\) must be a multiple of rl.minibatch_size \(4\)"),
        (("rl.minibatch_size=4", "rl.grad_accum=3"), r"rl.minibatch_size \(4\) must be a multiple of rl.grad_accum \(3\)"),
        (("rl.algorithm=grpo", "rl.batch_size=6", "rl.group_size=4"), r"rl.batch_size \(6\) must be a multiple of rl.group_size \(4\)"),
        (("rl.group_baseline=true", "rl.batch_size=6", "rl.minibatch_size=2", "rl.group_size=4"),
         r"rl.group_baseline: rl.batch_size \(6\) must be a multiple of rl.group_size \(4\)"),
        (("rl.reward=nonsense",), "use rm, direct, or module.path:function"),
        (("rl.reward=tests.test_rl_stage:no_such_function",), "cannot import it"),
    ],
)
def test_bad_configs_say_which_key(rl_config, overrides, message):
    cfg = rl_config(*overrides)
    with pytest.raises(CaiError, match=message):
        run_rl(cfg)
    assert not (Path(cfg.output_dir) / "rl").exists()


def test_a_reward_that_returns_the_wrong_number_of_scores_is_refused(rl_config):
    cfg = rl_config("rl.reward=tests.test_rl_stage:wrong_count_reward", "rl.batch_size=4", "rl.minibatch_size=2")
    with pytest.raises(CaiError, match="returned 1 scores for 4 answers"):
        run_rl(cfg)


def test_a_tokenizer_that_pads_with_eos_is_refused(rl_config, monkeypatch):
    import cai.models

    real = cai.models.load_tokenizer

    def pads_with_eos(name, cache_dir):
        tokenizer = real(name, cache_dir)
        tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    monkeypatch.setattr(cai.models, "load_tokenizer", pads_with_eos)
    cfg = rl_config()
    with pytest.raises(CaiError, match="pad token distinct from EOS"):
        run_rl(cfg)


# --------------------------------------------------------------------------------------------------
# Precision: float32 master weights, bf16 compute (the GPU default, forced onto the CPU)


def layer_weights_changed(before: dict, after: dict) -> float:
    """The share of the transformer layers' weights (every one gets a gradient) that an update moved
    (`before` as the model held it: in `after`'s dtype)."""
    names = [k for k in before if ".layers." in k]
    moved = sum(int((after[k] != before[k].to(after[k].dtype)).sum()) for k in names)
    return moved / sum(before[k].numel() for k in names)


def test_gpu_precision_trains_float32_master_weights_with_bf16_compute(rl_config, monkeypatch):
    """policy.dtype=bfloat16 is what `auto` resolves to on a bf16 GPU. What trains stays float32 and one
    small step (learning rate 1e-5, below bf16's resolution for most weights) moves nearly every weight;
    the frozen reference is bf16; the policy computes in bf16 (autocast)."""
    from safetensors.torch import load_file

    import cai.models

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert cai.models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert cai.models.mixed_precision("auto", torch.device("cuda")) == "bf16"

    cfg = rl_config("policy.dtype=bfloat16", "rl.steps=1", "rl.batch_size=4", "rl.minibatch_size=4", "rl.ppo_epochs=1",
                    "rl.learning_rate=1e-5", "rl.samples=0")
    sft_dir = Path(cfg.output_dir) / "sft"
    model, reference = build_models(cfg, sft_dir, None, "cpu")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    lora, _ = build_models(rl_config("policy.dtype=bfloat16", "rl.lora=true", "rl.lora_r=4"), sft_dir, None, "cpu")
    assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}  # adapters and value head
    assert {p.dtype for p in lora.parameters() if not p.requires_grad} == {torch.bfloat16}  # the frozen base

    compute_dtypes = set()
    real_build = rl.build_models

    def build_and_watch(*args, **kwargs):
        module, ref = real_build(*args, **kwargs)
        layer = module.policy.model.layers[0].self_attn.q_proj
        layer.register_forward_hook(lambda mod, inputs, output: compute_dtypes.add(output.dtype) if torch.is_grad_enabled() else None)
        return module, ref

    monkeypatch.setattr(rl, "build_models", build_and_watch)
    out = run_rl(cfg)
    assert compute_dtypes == {torch.bfloat16}
    before, after = load_file(sft_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert {t.dtype for t in after.values()} == {torch.float32}
    assert layer_weights_changed(before, after) > 0.9


def test_adamw_has_no_weight_decay(rl_config, monkeypatch):
    decays = []
    real = torch.optim.AdamW

    class RecordingAdamW(real):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            decays.extend(group["weight_decay"] for group in self.param_groups)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    run_rl(rl_config("rl.steps=1", "rl.batch_size=2", "rl.minibatch_size=2", "rl.samples=0"))
    assert decays and set(decays) == {0.0}


def test_gradients_sync_only_on_the_last_micro_batch(rl_config, monkeypatch):
    from accelerate import Accelerator

    skipped = []
    real = Accelerator.no_sync

    def counting_no_sync(self, model):
        skipped.append(1)
        return real(self, model)

    monkeypatch.setattr(Accelerator, "no_sync", counting_no_sync)
    # 2 steps x 2 epochs x 2 minibatches, each of 3 micro-batches: 2 of every 3 skip the sync
    run_rl(rl_config("rl.steps=2", "rl.ppo_epochs=2", "rl.batch_size=6", "rl.minibatch_size=3", "rl.grad_accum=3",
                     "rl.samples=0"))
    assert len(skipped) == 2 * 2 * 2 * 2


def test_answers_cut_at_the_length_limit_get_a_penalty_by_default(rl_config):
    assert load_config(None, []).rl.unfinished_score == -1.0
    cfg = rl_config("rl.steps=1", "rl.batch_size=4", "rl.minibatch_size=4", "rl.samples=0")
    run_rl(cfg)
    # No tiny-model answer ends within 8 tokens: each scores -1 whatever the reward says.
    assert [(m["ended_frac"], m["reward_mean"]) for m in metrics(cfg)] == [(0.0, -1.0)]
    assert metrics(cfg)[0]["raw_score_mean"] != -1.0
    assert any("only 0% of answers ended within 8 tokens" in w for w in metrics(cfg)[0]["warnings"])


def test_trl_algorithms_train_float32_master_weights_under_the_gpu_precision(rl_config, tiny_model_dir, monkeypatch):
    """dpo/grpo/rloo load the SFT model once, the same way: float32, with TRL's bf16=True compute."""
    from safetensors.torch import load_file

    import trl

    references = []

    class RecordingDPOTrainer(trl.DPOTrainer):
        def __init__(self, *args, ref_model=None, **kwargs):
            references.append(ref_model)
            super().__init__(*args, ref_model=ref_model, **kwargs)

    monkeypatch.setattr(trl, "DPOTrainer", RecordingDPOTrainer)
    cfg = rl_config("policy.dtype=bfloat16", "rl.algorithm=dpo", "rl.steps=1", "rl.batch_size=2", "rl.learning_rate=1e-5",
                    "rl.samples=0")
    save_preferences(cfg, [0.9] * 4)
    out = run_rl(cfg)
    assert {p.dtype for p in references[0].parameters()} == {torch.bfloat16}  # frozen: stored in bf16
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert {t.dtype for t in after.values()} == {torch.float32}
    assert layer_weights_changed(before, after) > 0.9


def test_grpo_samples_without_the_generation_config_penalties(rl_config, monkeypatch):
    from tests.test_models import assert_drawn_from_tempered_logits, record_generate

    cfg = with_shipped_sampling_defaults(rl_config("rl.algorithm=grpo", "rl.steps=1", "rl.batch_size=4", "rl.group_size=2",
                                                   "rl.ppo_epochs=1", "rl.temperature=0.7", "rl.samples=0"))
    generated = record_generate(monkeypatch)
    run_rl(cfg)
    assert generated
    assert_drawn_from_tempered_logits(generated[0], 0.7)


@pytest.mark.parametrize("reward, reruns", [("direct", True), ("rm", False)])
def test_editing_score_jinja_reruns_rl_only_when_the_labeler_scores_answers(tmp_path, reward, reruns):
    from cai.stages import stage_fingerprint
    from cai.templates import SHIPPED_PROMPTS

    folder = tmp_path / "templates"
    folder.mkdir()
    cfg = load_config(None, [f"rl.reward={reward}", f"templates={folder}"])
    before = {stage: stage_fingerprint(cfg, stage) for stage in ("rm", "rl", "eval")}
    (folder / "score.jinja").write_text((SHIPPED_PROMPTS / "score.jinja").read_text() + "\nRate strictly.\n")
    after = {stage: stage_fingerprint(cfg, stage) for stage in ("rm", "rl", "eval")}
    assert after["rm"] == before["rm"]
    assert (after["rl"] != before["rl"]) is reruns and (after["eval"] != before["eval"]) is reruns


def test_no_stage_imports_another_and_nothing_below_imports_a_stage():
    """Layers stay one-way: what stages share lives in modules below them (cai/training.py,
    cai/policy_models.py, ...); `cai rl` picks rl_trl.py for dpo/grpo/rloo (cli.run_stage)."""
    import ast

    package = ROOT / "cai"
    stage_modules = {p.stem for p in (package / "stages").glob("*.py") if p.stem != "__init__"}
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "cli.py":
            continue  # the command line runs the stages
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            imported = {n.split(".")[2] for n in names if n.startswith("cai.stages.") and n.count(".") >= 2}
            if imported & stage_modules - {path.stem}:
                offenders.append(f"{path.relative_to(ROOT)} imports {sorted(imported & stage_modules)}")
    assert offenders == []


def test_rl_seed_redraws_only_ppo_and_leaves_the_stages_before_it_current(rl_config, tmp_path):
    """rl.seed: the same prompts and reward, other rollouts; rl.seed equal to the run's seed is the run as
    it was; unset, it changes no fingerprint (runs made before the key existed stay current)."""
    from cai.config import load_config
    from cai.stage_state import fingerprint_parts

    short = ("rl.steps=1", "rl.batch_size=4", "rl.minibatch_size=2", "rl.samples=0")
    answers = {}
    for name, extra in (("default", ()), ("same", ("rl.seed=0",)), ("other", ("rl.seed=7",))):
        cfg = rl_config(*short, *extra, f"output_dir={tmp_path / name}")
        run_rl(cfg)
        step = metrics(cfg)[0]  # what the rollouts were: their reward, length and entropy
        answers[name] = (step["reward_mean"], step["answer_length"], step["entropy"])
    assert answers["same"] == answers["default"] and answers["other"] != answers["default"]
    base = load_config(None, [f"output_dir={tmp_path / 'x'}"])
    seeded = load_config(None, [f"output_dir={tmp_path / 'x'}", "rl.seed=7"])
    assert all(stage_fingerprint(base, s) == stage_fingerprint(seeded, s) for s in ("sl", "sft", "prefs", "rm"))
    assert stage_fingerprint(base, "rl") != stage_fingerprint(seeded, "rl")
    assert "seed" not in fingerprint_parts(base, "rl")["rl"]
