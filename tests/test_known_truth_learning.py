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



# A reward a hack can exploit, and a constraint that forbids the hack. The letter-e reward (10 x the share of
# an answer's characters that are 'e', clipped at 1) is bought by repeating one e-rich token; the
# constraint, a check measured on helpful prompts only, holds the mean of "not mostly e" at 0.6 or more,
# as the known-truth benchmark's helpfulness bound holds PPO to helping on helpful prompts. At temperature
# 0.1 the tiny random model's samples follow its mode, so that what PPO learns shows in a few steps.
FEW_E = {"expect": {"not": {"function": "tests.check_functions:mostly_e"}}}
HACKABLE = ("rl.reward=tests.test_rl_stage:letter_e_reward", "rl.temperature=0.1", "rl.reward_clip=1")
CONSTRAINED = ('rl.constraints=[{check: {expect: {not: {function: "tests.check_functions:mostly_e"}}}, at_least: 0.6, '
               'kind: helpful, lr: 8.0, name: few_e}]')


def held_out_check_score(cfg, model_dir: Path, kind: str, check) -> float:
    """The mean score of `check` on answers sampled at rl.temperature (4 per prompt) to the eval split's `kind` prompts."""
    model, tokenizer = load_model_and_tokenizer(str(model_dir), cfg, None)
    generator = LocalGenerator(model, tokenizer, 16, cfg.seed, None)
    prompts = split_prompts(cfg.data, cfg.seed)["eval"][kind]
    requests = [GenerateRequest([{"role": "user", "content": p.text}], max_new_tokens=12, temperature=cfg.rl.temperature, top_p=1.0,
                                sample_index=i) for p in prompts for i in range(4)]
    answers = generator.generate(requests)
    return sum(check.score(r.messages[-1]["content"], a.text or "", kind) for r, a in zip(requests, answers)) / len(answers)


def test_a_constraint_holds_where_the_unconstrained_policy_hacks_its_reward(tiny_config, tiny_model_dir, tmp_path):
    from cai.checks import compile_check
    from cai.records import read_jsonl

    few_e = compile_check(FEW_E)
    runs = {}
    for name, extra in (("free", ()), ("constrained", (CONSTRAINED,))):
        cfg = tiny_config(f"output_dir={tmp_path / name}", *LEARNING, *HACKABLE, *extra)
        sft_dir = Path(cfg.output_dir) / "sft"
        shutil.copytree(tiny_model_dir, sft_dir)
        mark_done(sft_dir, stage_fingerprint(cfg, "sft"))
        rl.run(cfg)
        rows = read_jsonl(Path(cfg.output_dir) / "rl" / "metrics.jsonl")
        runs[name] = {"before": held_out_check_score(cfg, sft_dir, "helpful", few_e),
                      "after": held_out_check_score(cfg, Path(cfg.output_dir) / "rl", "helpful", few_e),
                      "reward": [r["reward_mean"] for r in rows], "multiplier": [r.get("multiplier/few_e") for r in rows]}
        print(f"{name}: held-out 'not mostly e' on helpful prompts {runs[name]['before']:.2f} -> {runs[name]['after']:.2f}; "
              f"multiplier {' '.join(f'{x:.1f}' for x in runs[name]['multiplier'] if x is not None)}")
    free, held = runs["free"], runs["constrained"]
    assert free["before"] == held["before"] >= 0.6  # the SFT model keeps the constraint
    assert max(free["reward"][-5:]) >= 0.99 and free["after"] < 0.55  # the free policy hacks the reward and breaks it ...
    assert held["after"] >= 0.7  # ... the constrained one keeps it
    multiplier = held["multiplier"]
    assert multiplier[0] == 0.0 and max(multiplier) > 2.0  # it rose while the constraint was violated ...
    assert multiplier[-1] < max(multiplier) / 2  # ... and fell back once it held
