"""The fast learning test: with the check judge as the reward (rl.reward=direct, choice_labeler.backend=rules),
PPO raises the tiny model's compliance on held-out prompts; with the reward's sign flipped it does not."""

from __future__ import annotations

import shutil
from pathlib import Path

from cai.checks import compliance, distinct_checks
from cai.constitution import load_constitution
from cai.labelers import GenerateRequest, build_labeler
from cai.labelers.local import LocalGenerator
from cai.models import load_model_and_tokenizer
from cai.promptsets import split_prompts
from cai.records import mark_done
from cai.rewards import DirectLabelerReward
from cai.stages import rl, stage_fingerprint
from cai.templates import Templates
from tests.test_rl_stage import one_thread  # noqa: F401 - autouse: one torch thread, as the rl tests

CONSTITUTION = """\
name: letter-e
version: 1
critiques:
  - id: e
    critique: Does the answer use the letter e often enough?
    revision: Rewrite it with more of the letter e.
    check:
      expect: {function: "tests.check_functions:mostly_e"}
comparisons:
  - id: e
    question: Which answer uses the letter e more?
    check:
      expect: {function: "tests.check_functions:mostly_e"}
"""
LEARNING = ("rl.steps=30", "rl.batch_size=16", "rl.minibatch_size=8", "rl.ppo_epochs=4", "rl.learning_rate=1e-3",
            "rl.samples=0", "rl.adaptive_kl=false", "rl.kl_coef=0.05", "policy.max_new_tokens=12", "data.limit=40",
            "rl.unfinished_score=null")  # the tiny model's answers rarely end within 12 tokens: score them as they are
CONFIG = None  # the config of the flipped-sign run, read by `flipped_check_reward`


def flipped_check_reward(prompts: list[str], answers: list[str]) -> list[float]:
    """The check judge's reward with its sign flipped: a broken learning signal."""
    reward = DirectLabelerReward(build_labeler(CONFIG, role="choices"), load_constitution(CONFIG.constitution), Templates(None), CONFIG)
    return [-r for r in reward(prompts, answers)]


def held_out_compliance(cfg, model_dir: Path) -> float:
    """Share of the eval split's prompts (no RL prompt among them) whose greedy answer passes the check."""
    model, tokenizer = load_model_and_tokenizer(str(model_dir), cfg, None)
    generator = LocalGenerator(model, tokenizer, 16, cfg.seed, None)
    split = split_prompts(cfg.data, cfg.seed)
    prompts = split["eval"]["red_team"] + split["eval"]["helpful"]
    assert not {p.text for p in prompts} & {p.text for kind in split["rl"].values() for p in kind}
    answers = generator.generate([GenerateRequest([{"role": "user", "content": p.text}], max_new_tokens=12, temperature=0) for p in prompts])
    checks = distinct_checks(load_constitution(cfg.constitution))
    return sum(compliance(checks, p.text, a.text or "", p.kind)["complies"] for p, a in zip(prompts, answers)) / len(prompts)


def run_rl(tiny_config, tiny_model_dir, tmp_path, name: str, *overrides: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONSTITUTION)
    cfg = tiny_config(f"output_dir={tmp_path / name}", f"constitution={path}", "choice_labeler.backend=rules", *LEARNING, *overrides)
    sft_dir = Path(cfg.output_dir) / "sft"
    shutil.copytree(tiny_model_dir, sft_dir)
    mark_done(sft_dir, stage_fingerprint(cfg, "sft"))
    rl.run(cfg)
    return cfg, held_out_compliance(cfg, sft_dir), held_out_compliance(cfg, Path(cfg.output_dir) / "rl")


def test_ppo_on_the_check_judge_raises_held_out_compliance_and_not_with_the_sign_flipped(tiny_config, tiny_model_dir, tmp_path):
    global CONFIG
    cfg, before, after = run_rl(tiny_config, tiny_model_dir, tmp_path, "learns", "rl.reward=direct")
    print(f"held-out compliance: {before:.2f} -> {after:.2f}")
    assert after >= before + 0.3
    CONFIG = cfg.model_copy(update={"output_dir": str(tmp_path / "flipped")})
    _, before_flipped, after_flipped = run_rl(tiny_config, tiny_model_dir, tmp_path, "flipped",
                                              "rl.reward=tests.test_known_truth_learning:flipped_check_reward")
    print(f"sign flipped: {before_flipped:.2f} -> {after_flipped:.2f}")
    assert before_flipped == before and after_flipped < before_flipped + 0.3 and after_flipped <= before_flipped
