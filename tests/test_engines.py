"""The engines' own client code against `cai serve` (installed from the package registry without their GPU
dependencies, `make install`): OpenRLHF 0.11's SingleTurnAgentExecutor (one rollout per request, its
`_fetch_rewards_via_http`) and its conversion of the reply into tensors, in the three modes; verl 0.9's
reward loop worker with its naive and GDPO reward managers calling cai's async compute_score; TRL's
GRPOTrainer with one reward function per principle and normalize_then_sum, and its OnlineDPOTrainer."""

from __future__ import annotations

import ast
import asyncio
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from cai.serve import Judge, create_app, policy_markup
from tests.test_serve import QUALITY, JudgeLabeler, Service, config, post, shown
from tests.tiny import FAMILY_TEMPLATES, make_family_tokenizer

QUESTIONS = [f"Question number {k}: how do I bake bread?" for k in range(8)]
ANSWERS = ["great answer", "fine answer", "poor answer", "reference answer"]


class SeeingLabeler(JudgeLabeler):
    """The scripted judge, recording the user text and the answers it was shown (to check they are plain)."""

    def __init__(self):
        super().__init__()
        self.prompts_seen: set[str] = set()
        self.answers_seen: set[str] = set()

    def choose(self, requests, desc=None, **kwargs):
        for r in requests:
            self.prompts_seen.add(r.subject["prompt"])
            text = r.messages[-1]["content"]
            if len(r.options) == 2:
                self.answers_seen.update(shown(text))
        return super().choose(requests, desc, **kwargs)


class Policy:
    """Stands in for the vLLM engine OpenRLHF samples from: for each prompt, its next answer of ANSWERS,
    with the family's end-of-turn tokens, as token ids."""

    def __init__(self, tokenizer, end: str):
        self.tokenizer, self.end, self.served = tokenizer, end, {}

    async def generate(self, prompt_token_ids, params, multi_modal_data=None):
        key = tuple(prompt_token_ids)
        answer = ANSWERS[self.served.get(key, 0) % len(ANSWERS)]
        self.served[key] = self.served.get(key, 0) + 1
        await asyncio.sleep(0.01 * (len(answer) % 3))  # samples finish at different times
        ids = self.tokenizer(answer + self.end, add_special_tokens=False)["input_ids"]
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason="stop", logprobs=None)])


def openrlhf_experience():
    """OpenRLHF's SamplesGenerator._process_response_into_experience, its own source compiled as it is: the
    module around it imports ray and vllm at the top, which this machine does not have."""
    import openrlhf
    import torch
    from openrlhf.trainer.ppo_utils.experience import Experience

    path = Path(openrlhf.__file__).parent / "trainer" / "ppo_utils" / "samples_generator.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SamplesGenerator")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "_process_response_into_experience")
    namespace = {"torch": torch, "Experience": Experience}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["_process_response_into_experience"]


def run_openrlhf(url: str, tokenizer, family: str, questions: list[str], samples: int, labels=None):
    """Every sample of every prompt through OpenRLHF's executor at once, as its rollout does; the replies
    turned into Experiences by OpenRLHF's own code. -> [(question, answer, Experience)]"""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    executor = SingleTurnAgentExecutor(url + "/get_reward")
    policy = Policy(tokenizer, FAMILY_TEMPLATES[family]["end"])
    params = SimpleNamespace(max_tokens=32, logprobs=None)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in questions]

    async def everything():
        return await asyncio.gather(*(executor.execute(p, (labels or {}).get(q, ""), params, 256, tokenizer, policy)
                                      for p, q in zip(prompts, questions) for _ in range(samples)))

    to_experience = openrlhf_experience()
    out = []
    for response, question in zip(asyncio.run(everything()), [q for q in questions for _ in range(samples)]):
        answer = tokenizer.decode(response["observation_tokens"][response["action_ranges"][0][0]:], skip_special_tokens=True)
        out.append((question, answer.strip(), to_experience(None, response, max_len=256), response))
    return out


def cai_rewards(url: str, pairs: list[tuple[str, str]], mode: str, references=None) -> list[float]:
    items = [{"prompt": q, "answer": a, **({"reference": references} if references else {})} for q, a in pairs]
    status, body = post(url + "/v1/score", {"mode": mode, "items": items})
    assert status == 200 and all(r["status"] == "ok" for r in body["results"])
    return [r["reward"] for r in body["results"]]


def test_openrlhf_client_in_group_mode_one_rollout_per_request(tmp_path):
    """8 prompts x 4 samples, each sample its own request, all at once: the rewards are those of the same
    answers sent together through cai's protocol, and the judge saw plain text."""
    tokenizer = make_family_tokenizer("llama3")
    labeler = SeeingLabeler()
    cfg = config(tmp_path, "serve.mode=group", "serve.group_size=4", "serve.group_wait=30", "prefs.principles_per_pair=1")
    with Service(create_app(cfg, Judge(cfg, labeler=labeler))) as service:
        results = run_openrlhf(service.url, tokenizer, "llama3", QUESTIONS, samples=4)
        together = cai_rewards(service.url, [(q, a) for q, a, _, _ in results], "group")
        metrics = post(service.url + "/v1/score", {"items": []})
    rewards = [e.rewards.item() for _, _, e, _ in results]
    assert rewards == pytest.approx(together)
    assert all(e.info["judge_ok"].item() == 1.0 for _, _, e, _ in results)
    for q in QUESTIONS:  # win rates of a whole group average 0.5, and they separate its answers
        mine = [r for (question, _, _, _), r in zip(results, rewards) if question == q]
        assert sum(mine) == pytest.approx(2.0) and len(set(mine)) > 1
    assert labeler.prompts_seen == set(QUESTIONS) and labeler.answers_seen <= set(QUALITY)
    assert metrics[0] == 200


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_openrlhf_client_pointwise_and_pairwise(tmp_path, mode):
    tokenizer = make_family_tokenizer("qwen")
    folder = tmp_path / "policy-tokenizer"
    tokenizer.save_pretrained(folder)  # the policy's own template, as serve.policy_model
    labeler = SeeingLabeler()
    cfg = config(tmp_path, f"serve.mode={mode}", f"serve.policy_model={folder}")
    labels = {q: json.dumps({"reference": "reference answer", "kind": "helpful"}) for q in QUESTIONS[:2]} \
        if mode == "pairwise" else None
    with Service(create_app(cfg, Judge(cfg, labeler=labeler), policy_markup(cfg))) as service:
        results = run_openrlhf(service.url, tokenizer, "qwen", QUESTIONS[:2], samples=3, labels=labels)
        conversation = lambda q: [{"role": "system", "content": "You are a helpful assistant."},  # noqa: E731
                                  {"role": "user", "content": q}]  # what qwen's template adds
        items = [{"prompt": conversation(q), "answer": a, "reference": "reference answer" if labels else None}
                 for q, a, _, _ in results]
        body = post(service.url + "/v1/score", {"mode": mode, "items": items})[1]
    rewards = [e.rewards.item() for _, _, e, _ in results]
    assert rewards == pytest.approx([r["reward"] for r in body["results"]])
    expected = {"pointwise": {"great answer": 1.0, "fine answer": 1.5 / 4.5, "poor answer": -1.0},
                "pairwise": {"great answer": 3 / 5, "fine answer": 1 / 2, "poor answer": 1 / 3}}[mode]
    assert rewards == pytest.approx([expected[a] for _, a, _, _ in results])
    assert labeler.prompts_seen == set(QUESTIONS[:2])
    if mode == "pairwise":  # the kind came in the label, and per-principle values came in extra_logs
        responses = [r for _, _, _, r in results]
        assert all(set(r["extra_logs"]) == {"judge_ok", "principle/less_harmful", "principle/more_helpful"} for r in responses)
        experience = results[0][2]
        assert experience.info["principle/less_harmful"].shape == (1, 1)


# -------------------------------------------------------------------------------------------------
# verl 0.9


def verl_data(tokenizer, items: list[tuple[str, str, str]]):
    """A DataProto as verl's rollout hands it to the reward loop: prompt and response ids, the attention
    mask, data_source, reward_model.ground_truth, extra_info (with the prompt, as cai needs) and uid."""
    import numpy as np
    import torch
    from verl import DataProto

    width_p, width_r = 48, 24
    prompts = torch.full((len(items), width_p), tokenizer.pad_token_id)
    responses = torch.full((len(items), width_r), tokenizer.pad_token_id)
    mask = torch.zeros((len(items), width_p + width_r), dtype=torch.long)
    for row, (_, question, answer) in enumerate(items):
        p = tokenizer(question, add_special_tokens=False)["input_ids"][-width_p:]
        r = tokenizer(answer, add_special_tokens=False)["input_ids"][:width_r]
        prompts[row, width_p - len(p):] = torch.tensor(p)
        responses[row, : len(r)] = torch.tensor(r)
        mask[row, width_p - len(p): width_p + len(r)] = 1
    return DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": mask},
        non_tensors={"data_source": np.array(["cai"] * len(items), dtype=object),
                     "reward_model": np.array([{"ground_truth": None} for _ in items], dtype=object),
                     "extra_info": np.array([{"prompt": q, "kind": "helpful"} for _, q, _ in items], dtype=object),
                     "uid": np.array([uid for uid, _, _ in items], dtype=object)})


def verl_config(tokenizer_dir, manager: str, url: str):
    from omegaconf import OmegaConf

    import cai.integrations

    return OmegaConf.create({
        "actor_rollout_ref": {"model": {"path": str(tokenizer_dir), "tokenizer_path": None}},
        "trainer": {"experiment_name": "cai-test"},
        "reward": {"custom_reward_function": {"path": cai.integrations.__file__, "name": "compute_score",
                                              "reward_kwargs": {"url": url}},
                   "reward_manager": {"source": "register", "name": manager,
                                      "module": {"path": None, "name": "custom_reward_manager"}},
                   "reward_model": {"enable": False}},
    })


def test_verl_reward_loop_with_a_failing_item_and_gdpo_keys(tmp_path):
    """verl's RewardLoopWorker awaits cai's compute_score for every answer at once (naive and GDPO
    managers); the service gathers each prompt's answers into its group; an answer the judge cannot score
    gets serve.failed_reward, and the per-principle keys reach verl's GDPO advantage."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
    from verl.trainer.ppo.core_algos import compute_gdpo_outcome_advantage

    tokenizer = make_family_tokenizer("llama3")
    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(folder)
    items = [(f"uid{k}", q, a) for k, q in enumerate(QUESTIONS[:2]) for a in ANSWERS]
    items[5] = (items[5][0], items[5][1], "FAIL answer")  # the labeler gives up on this one
    cfg = config(tmp_path, "serve.mode=group", "serve.group_size=4", "serve.group_wait=20", "serve.failed_reward=0.0")
    with Service(create_app(cfg, Judge(cfg, labeler=JudgeLabeler()))) as service:
        outputs = {}
        for manager in ("naive", "gdpo"):
            worker = RewardLoopWorker(verl_config(folder, manager, service.url))
            outputs[manager] = worker.loop.run_until_complete(worker.compute_score_batch(verl_data(tokenizer, items)))
    for manager, out in outputs.items():
        scores = [o["reward_score"] for o in out]
        assert None not in scores and scores[5] == 0.0  # failed: serve.failed_reward, not None
        assert [o["reward_extra_info"]["judge_ok"] for o in out] == [1.0] * 5 + [0.0] + [1.0] * 2
        assert sum(scores[:4]) == pytest.approx(2.0)  # a whole group of four, gathered across calls
        keys = set(out[0]["reward_extra_info"])
        assert keys == {"score", "judge_ok", "less_harmful", "more_helpful"} and all(set(o["reward_extra_info"]) == keys for o in out)
    # as verl's RewardLoopManager assembles the batch, then GDPO reads the per-principle keys
    out = outputs["gdpo"]
    data = verl_data(tokenizer, items)
    rm_scores = RewardManagerBase.assemble_rm_scores(data, [o["reward_score"] for o in out])
    non_tensor = {k: np.array([o["reward_extra_info"][k] for o in out]) for k in out[0]["reward_extra_info"]}
    response_mask = data.batch["attention_mask"][:, data.batch["prompts"].size(1):]
    algorithm = OmegaConf.create({"gdpo_reward_keys": ["less_harmful", "more_helpful"], "norm_adv_by_std_in_grpo": True})
    advantages, _ = compute_gdpo_outcome_advantage(rm_scores, response_mask, np.array([u for u, _, _ in items]),
                                                   config=algorithm, non_tensor_batch=non_tensor, batch=data.batch)
    assert advantages.shape == response_mask.shape and torch.isfinite(advantages).all()
    best = advantages[0][response_mask[0].bool()].mean(), advantages[2][response_mask[2].bool()].mean()
    assert best[0] > best[1]  # "great answer" above "poor answer"


# -------------------------------------------------------------------------------------------------
# TRL 1.16


class ShortestFirst(JudgeLabeler):
    """Prefers the shorter answer under the first principle and the longer under the second: two objectives
    that pull apart, as per-principle normalisation is for."""

    def choose(self, requests, desc=None, **kwargs):
        from cai.labelers.base import Choice

        out = []
        for r in requests:
            self.usage.requests += 1
            a, b = shown(r.messages[-1]["content"] + "\n")
            sign = 1 if r.subject["principle"] == "less_harmful" else -1
            p = 1 / (1 + 2.718 ** (sign * (len(a) - len(b)) / 10))
            out.append(Choice([p, 1 - p], method="logprobs"))
        return out


def test_trl_grpo_with_one_reward_function_per_principle_and_normalize_then_sum(tmp_path, tiny_model_dir):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from cai.integrations import TRLReward

    cfg = config(tmp_path, "serve.mode=group", "serve.per_principle=true")
    with Service(create_app(cfg, Judge(cfg, labeler=ShortestFirst()))) as service:
        funcs = TRLReward.per_principle(service.url)
        assert [f.__name__ for f in funcs] == ["less_harmful", "more_helpful"]
        args = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, logging_steps=1, report_to="none", bf16=False, use_cpu=True,
                          save_strategy="no", reward_weights=[1.0, 0.5], multi_objective_aggregation="normalize_then_sum")
        prompts = [[{"role": "user", "content": p}] for p in ("How do I bake bread?", "Explain why this is wrong.")]
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), reward_funcs=funcs, args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": prompts * 4, "kind": ["helpful"] * 8}),
                              processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
        trainer.train()
    logged = [e for e in trainer.state.log_history if "rewards/less_harmful/mean" in e]
    assert len(logged) == 2
    for entry in logged:  # one judge call per batch, read by both functions: each a group's win rates
        assert entry["rewards/less_harmful/mean"] == pytest.approx(0.5) and entry["rewards/more_helpful/mean"] == pytest.approx(0.5)
    assert funcs[0].last_results is funcs[1].last_results and funcs[0].last_results[0].details["kind"] == "helpful"


def test_trl_online_dpo_with_the_adapter_as_its_reward(tmp_path, tiny_model_dir):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from cai.integrations import TRLRewardSync
    from tests.test_serve import ShorterIsBetter

    cfg = config(tmp_path, "serve.mode=group", "prefs.principles_per_pair=1")
    labeler = ShorterIsBetter()
    with Service(create_app(cfg, Judge(cfg, labeler=labeler))) as service:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        before = [p.detach().clone() for p in model.parameters()]
        args = OnlineDPOConfig(output_dir=str(tmp_path / "odpo"), max_steps=2, per_device_train_batch_size=2,
                               max_new_tokens=8, logging_steps=1, report_to="none", bf16=False, use_cpu=True,
                               save_strategy="no")
        prompts = [[{"role": "user", "content": p}] for p in ("How do I bake bread?", "Explain why this is wrong.")]
        trainer = OnlineDPOTrainer(model=model, reward_funcs=TRLRewardSync(service.url), args=args,
                                   train_dataset=datasets.Dataset.from_dict({"prompt": prompts * 2}),
                                   processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
        trainer.train()
    assert sum(labeler.choose_calls) == 2 * 2 * 1 * 2  # per step: 2 prompts, one pair each, 1 principle, 2 orders
    logged = [e for e in trainer.state.log_history if "objective/scores" in e]
    assert logged and all(e["objective/scores"] == pytest.approx(0.5) for e in logged)  # each pair's win rates: p, 1 - p
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
