"""The prefs and rm stages on the tiny model: records and their provenance, TRL's preference format, resume
without relabeling, refusal of bad datasets, the soft-label loss on hand-computed numbers, and a tiny
end-to-end prefs -> rm whose reward model the RL stage can read."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch

from cai import reward_training
from cai.errors import CaiError
from cai.preferences import check_preference_dataset
from cai.records import read_jsonl
from cai.stages import prefs, rm, sft, sl
from tests.fakes import ScriptedLabeler, shown_answers


def good_first(text: str) -> float:
    """Prefers the longer of the two answers shown, with a bias toward (A)."""
    a, b, _ = shown_answers(text)
    return 0.55 + (0.3 if len(a) > len(b) else -0.3 if len(a) < len(b) else 0.0)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir):
    """sl (scripted labeler) and sft on the tiny model, once for the module."""
    from cai.config import load_config

    root = tmp_path_factory.mktemp("prefs-run")
    overrides = [
        f"output_dir={root / 'run'}", f"cache_dir={root / 'cache'}", f"policy.model={tiny_model_dir}",
        f"labeler.model={tiny_model_dir}", "constitution=constitutions/tiny.yaml", "policy.max_new_tokens=8",
        "labeler.max_new_tokens=8", "data.limit=10", "sft.max_length=128", "sft.batch_size=4", "labeler.cache=false",
    ]
    cfg = load_config(None, overrides)
    original = sl.build_labeler
    sl.build_labeler = lambda cfg, shared_models=None, role=None: ScriptedLabeler()
    try:
        sl.run(cfg)
    finally:
        sl.build_labeler = original
    sft.run(cfg)
    return overrides


def copy_run(overrides: list[str], target: Path, stages: tuple[str, ...]):
    """A config factory over a copy of the finished `stages` of the run that `overrides` describe."""
    import shutil

    from cai.config import load_config

    source = Path(dict(o.split("=", 1) for o in overrides)["output_dir"])
    for stage in stages:
        shutil.copytree(source / stage, target / stage)

    def make(*extra: str):
        return load_config(None, [*overrides, f"output_dir={target}", "rm.batch_size=4", "rm.epochs=2", "rm.learning_rate=1e-3", *extra])

    return make


@pytest.fixture
def make_cfg(sft_run, tmp_path):
    """A config over a copy of the module's finished sl/sft run."""
    return copy_run(sft_run, tmp_path / "run", ("sl", "sft"))


@pytest.fixture(scope="module")
def prefs_run(sft_run, tmp_path_factory):
    """One prefs run (K = 3, scripted labeler) shared by the tests that only read it:
    (config, labeler, overrides that rebuild the config)."""
    target = tmp_path_factory.mktemp("prefs") / "run"
    make = copy_run(sft_run, target, ("sl", "sft"))
    cfg = make("prefs.samples_per_prompt=3")
    fake = ScriptedLabeler(prefer=good_first)
    original = prefs.build_labeler
    prefs.build_labeler = lambda cfg, shared_models=None, role=None: fake
    try:
        prefs.run(cfg)
    finally:
        prefs.build_labeler = original
    return cfg, fake, [*sft_run, f"output_dir={target}", "prefs.samples_per_prompt=3"]


def test_prefs_records_dataset_and_trl_format(prefs_run):
    cfg, labeler, _ = prefs_run
    out = Path(cfg.output_dir) / "prefs"
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 3 + 3 and all(len(s["answers"]) == 3 for s in samples)  # 30% of 10 of each kind
    records = read_jsonl(out / "records.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    skipped = sum(summary["skipped_pairs"].values())
    assert len(records) + skipped == len(samples) * 3
    record = records[0]
    assert record["labeler"] == "scripted:test" and record["status"] == "ok"
    assert len(record["answers"]) == 2 and len(record["principles"]) == 2  # tiny.yaml has 2 comparisons
    for entry in record["principles"]:
        assert set(entry["orders"]) == {"ab", "ba"}
        assert entry["p_first"] == pytest.approx((entry["orders"]["ab"]["p_first"] + entry["orders"]["ba"]["p_first"]) / 2)
    assert record["label_prob"] == pytest.approx(sum(e["p_first"] for e in record["principles"]) / 2)

    dataset = datasets.load_from_disk(str(out / "dataset"))
    assert {"prompt", "chosen", "rejected", "label_prob"} <= set(dataset.column_names)
    assert len(dataset) == summary["labeled"] == len(records)
    row = dataset[0]
    assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert all(p >= 0.5 for p in dataset["label_prob"])
    by_id = {r["id"]: r for r in records}
    source = by_id[row["id"]]
    first, second = source["answers"]
    assert row["chosen"][0]["content"] == (first if source["label_prob"] >= 0.5 else second)
    check_preference_dataset(dataset, "prefs")
    assert labeler.usage.requests == 2 * 2 * len(records)  # principles x orders per pair


def test_dataset_loads_into_reward_and_dpo_trainers(prefs_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    cfg, _, _ = prefs_run
    out = Path(cfg.output_dir) / "prefs"
    dataset = datasets.load_from_disk(str(out / "dataset"))
    sft_dir = str(Path(cfg.output_dir) / "sft")
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    common = dict(output_dir=str(tmp_path / "t"), max_steps=1, per_device_train_batch_size=2, report_to="none", bf16=False)
    model = AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=dataset, processing_class=tokenizer).train()
    policy = AutoModelForCausalLM.from_pretrained(sft_dir)
    DPOTrainer(model=policy, args=DPOConfig(**common), train_dataset=dataset, processing_class=tokenizer).train()


def test_interrupted_labeling_resumes_without_relabeling(make_cfg, monkeypatch):
    class Dies(ScriptedLabeler):
        def choose(self, requests, desc=None):
            if self.usage.requests >= 2 * 4 * 2:  # two batches of pairs, then "killed"
                raise KeyboardInterrupt
            return super().choose(requests, desc)

    cfg = make_cfg("labeler.batch_size=2")
    monkeypatch.setattr(prefs, "build_labeler", lambda cfg, shared_models=None, role=None: Dies(prefer=good_first))
    with pytest.raises(KeyboardInterrupt):
        prefs.run(cfg)
    out = Path(cfg.output_dir) / "prefs"
    partial = read_jsonl(out / "records.jsonl")
    assert len(partial) == 4 and not (out / "DONE").exists()
    samples_before = (out / "samples.jsonl").read_text()

    second = ScriptedLabeler(prefer=good_first)
    monkeypatch.setattr(prefs, "build_labeler", lambda cfg, shared_models=None, role=None: second)
    prefs.run(cfg)
    final = read_jsonl(out / "records.jsonl")
    ids = [r["id"] for r in final]
    assert len(ids) == len(set(ids)) and ids[:4] == [r["id"] for r in partial]
    assert second.usage.requests == 2 * 2 * (len(final) - 4)  # only the pairs not yet recorded
    assert (out / "samples.jsonl").read_text() == samples_before  # nothing sampled twice


def test_bad_preference_datasets_are_refused_with_the_reason():
    good = {"prompt": [[{"role": "user", "content": "hi"}]], "chosen": [[{"role": "assistant", "content": "a"}]],
            "rejected": [[{"role": "assistant", "content": "b"}]], "label_prob": [0.7]}
    check_preference_dataset(datasets.Dataset.from_dict(good), "d")
    with pytest.raises(CaiError, match=r"d: the preference dataset has no column 'label_prob'"):
        check_preference_dataset(datasets.Dataset.from_dict({k: v for k, v in good.items() if k != "label_prob"}), "d")
    with pytest.raises(CaiError, match=r"no column 'rejected'"):
        check_preference_dataset(datasets.Dataset.from_dict({k: v for k, v in good.items() if k != "rejected"}), "d")
    empty = dict(good, rejected=[[{"role": "assistant", "content": "  "}]])
    with pytest.raises(CaiError, match=r"d: row 0: the 'rejected' answer is empty"):
        check_preference_dataset(datasets.Dataset.from_dict(empty), "d")
    with pytest.raises(CaiError, match=r"label_prob must be a probability"):
        check_preference_dataset(datasets.Dataset.from_dict(dict(good, label_prob=[1.5])), "d")
    check_preference_dataset(datasets.Dataset.from_dict({k: v for k, v in good.items() if k != "label_prob"}), "d", need_label_prob=False)


def test_soft_label_loss_on_hand_computed_numbers():
    chosen = torch.tensor([1.0, 0.0, 2.0])
    rejected = torch.tensor([0.0, 1.0, 2.0])  # differences 1, -1, 0
    labels = torch.tensor([0.8, 0.5, 1.0])
    log_s1, log_s_1 = math.log(1 / (1 + math.exp(-1))), math.log(1 / (1 + math.exp(1)))
    expected = (-(0.8 * log_s1 + 0.2 * log_s_1) - (0.5 * log_s_1 + 0.5 * log_s1) + math.log(2)) / 3
    assert reward_training.soft_label_loss(chosen, rejected, labels).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.6732235, abs=1e-6)
    # label 1 is TRL's Bradley-Terry loss
    ones = torch.ones(3)
    bt = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    assert reward_training.soft_label_loss(chosen, rejected, ones).item() == pytest.approx(bt.item(), abs=1e-6)


def test_the_trainer_uses_the_soft_label_loss(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    data = datasets.Dataset.from_dict({
        "prompt": [[{"role": "user", "content": "hi"}]] * 2,
        "chosen": [[{"role": "assistant", "content": "a good answer"}], [{"role": "assistant", "content": "yes"}]],
        "rejected": [[{"role": "assistant", "content": "bad"}], [{"role": "assistant", "content": "no, go away"}]],
        "label_prob": [0.9, 0.6],
    })
    args = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to="none", bf16=False, max_steps=1)
    trainer = reward_training.soft_label_trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert batch["label_prob"].tolist() == pytest.approx([0.9, 0.6])
    model.eval()
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    expected = reward_training.soft_label_loss(logits[:2], logits[2:], torch.tensor([0.9, 0.6]))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_end_to_end_prefs_then_rm(prefs_run, tmp_path):
    from cai.rewards import RewardModelScorer

    make_cfg = copy_run(prefs_run[2], tmp_path / "run", ("sl", "sft", "prefs"))
    cfg = make_cfg("rm.eval_fraction=0.25")
    out = rm.run(cfg)
    for name in ("config.json", "normalization.json", "metrics.json", "scoring.json", "DONE", "tokenizer_config.json"):
        assert (out / name).exists(), name
    assert not (out / "checkpoints").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss"] == "soft-label cross-entropy" and metrics["steps"] > 0
    held = metrics["held_out"]
    assert held["pairs"] >= 1 and 0.0 <= held["accuracy"] <= 1.0 and held["expected_calibration_error"] is not None
    norm = json.loads((out / "normalization.json").read_text())
    assert set(norm) == {"mean", "std"} and norm["std"] > 0

    # the contract with the RL stage: normalised rewards, mean 0 and std 1 on the SFT samples
    scorer = RewardModelScorer(out, cfg.cache_dir)
    assert scorer.model.config.num_labels == 1 and scorer.model.config.pad_token_id is not None
    samples = read_jsonl(Path(cfg.output_dir) / "prefs" / "samples.jsonl")
    prompts = [s["prompt"] for s in samples for a in s["answers"] if a.strip()]
    answers = [a for s in samples for a in s["answers"] if a.strip()]
    scores = scorer(prompts, answers)
    assert sum(scores) / len(scores) == pytest.approx(0.0, abs=1e-3)
    assert (sum(s * s for s in scores) / len(scores)) ** 0.5 == pytest.approx(1.0, abs=1e-3)

    # training moved the weights away from the SFT model's
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(Path(cfg.output_dir) / "sft")
    trained = scorer.model.model.embed_tokens.weight
    assert not torch.allclose(base.model.embed_tokens.weight, trained)

    # rm refuses a broken dataset in one line, before writing anything
    broken = datasets.load_from_disk(str(Path(cfg.output_dir) / "prefs" / "dataset")).remove_columns("label_prob")
    broken.save_to_disk(str(Path(cfg.output_dir) / "prefs" / "dataset2"))
    import shutil

    shutil.rmtree(Path(cfg.output_dir) / "prefs" / "dataset")
    (Path(cfg.output_dir) / "prefs" / "dataset2").rename(Path(cfg.output_dir) / "prefs" / "dataset")
    with pytest.raises(CaiError, match="no column 'label_prob'"):
        rm.run(make_cfg("rm.eval_fraction=0.25", "rm.epochs=1"))
    rm.run(make_cfg("rm.eval_fraction=0.25", "rm.hard_labels=true", "rm.epochs=1"))  # hard labels need no label_prob
    assert json.loads((out / "metrics.json").read_text())["loss"] == "hard Bradley-Terry"


def test_a_reward_model_is_trained_further_from_a_finished_one(prefs_run, tmp_path):
    """`train_reward_model` continues from an rm/ folder (its weights and head) as the rl stage's rounds
    call it, or starts afresh from sft/; the result is a reward model RewardModelScorer reads."""
    from transformers import AutoModelForSequenceClassification

    from cai.rewards import RewardModelScorer

    make_cfg = copy_run(prefs_run[2], tmp_path / "run", ("sl", "sft", "prefs"))
    cfg = make_cfg("rm.eval_fraction=0")
    run_dir = Path(cfg.output_dir)
    first = rm.run(cfg)
    dataset = datasets.load_from_disk(str(run_dir / "prefs" / "dataset"))
    samples = [(s["prompt"], a) for s in read_jsonl(run_dir / "prefs" / "samples.jsonl") for a in s["answers"] if a.strip()]
    tiny = make_cfg("rm.eval_fraction=0", "rm.learning_rate=1e-9", "rm.epochs=1")  # a step that barely moves anything
    metrics = reward_training.train_reward_model(tiny, dataset.select(range(4)), tmp_path / "again", start_from=first,
                                                 normalize_on=samples)
    assert metrics["steps"] >= 1 and metrics["started_from"] == str(first)

    def head(folder):
        return AutoModelForSequenceClassification.from_pretrained(folder).score.weight

    continued, rm_head = head(tmp_path / "again"), head(first)
    assert torch.allclose(continued, rm_head, atol=1e-6)  # the reward model's own head, not a fresh one
    fresh = reward_training.train_reward_model(tiny, dataset.select(range(4)), tmp_path / "fresh", start_from=run_dir / "sft",
                                               normalize_on=samples)
    assert fresh["started_from"] == str(run_dir / "sft") and not torch.allclose(head(tmp_path / "fresh"), rm_head, atol=1e-3)
    scores = RewardModelScorer(tmp_path / "again", cfg.cache_dir)([p for p, _ in samples], [a for _, a in samples])
    assert abs(sum(scores) / len(scores)) < 1e-3  # normalised on the samples given


def test_reward_model_held_out_pairs_are_split_by_prompt():
    """Several pairs per prompt (more than two samples per prompt): a prompt's pairs are all held out or
    all trained on, so held-out accuracy is measured on unseen prompts."""
    rows = [(f"prompt {p}", f"answer {p}.{k}") for p in range(12) for k in range(3)]
    dataset = datasets.Dataset.from_dict({
        "prompt": [[{"role": "user", "content": p}] for p, _ in rows],
        "chosen": [[{"role": "assistant", "content": a}] for _, a in rows],
        "rejected": [[{"role": "assistant", "content": "no"}] for _ in rows],
    })
    for seed in range(5):
        train, held_out = reward_training.split_dataset(dataset, 0.25, seed)
        train_prompts = {r["prompt"][0]["content"] for r in train}
        held_prompts = {r["prompt"][0]["content"] for r in held_out}
        assert held_prompts and not train_prompts & held_prompts
        assert len(train) + len(held_out) == len(dataset) and len(held_out) == 9  # 3 prompts x 3 pairs
    assert len(reward_training.split_dataset(dataset, 0.0, 0)[1]) == 0


def test_stress_pairs_put_known_hacks_beside_good_answers_for_the_labeler(make_cfg, monkeypatch, tmp_path):
    """prefs.stress_pairs: N more pairs, each a probe of `cai stress` written for a good answer (here the
    tiny constitution's worked examples, and the SFT model's own answer on a helpful prompt for the probes
    of over-refusal), every probe on every kind before any repeats; the labeler's label is kept as it
    judged (a probe it prefers is counted, not overruled), and the pairs reach the dataset."""
    from cai import stress
    from cai.constitution import load_constitution

    fake = ScriptedLabeler(prefer=good_first)  # the longer answer: "{good} {good} {good} {good}" fools it
    monkeypatch.setattr(prefs, "build_labeler", lambda cfg, shared_models=None, role=None: fake)
    cfg = make_cfg("prefs.stress_pairs=40")
    prefs.run(cfg)
    out = Path(cfg.output_dir) / "prefs"
    records = read_jsonl(out / "records.jsonl")
    hacks = [r for r in records if r["id"].startswith("stress:")]
    assert len(hacks) == 40 and fake.usage.requests == 2 * 2 * len(records)

    constitution = load_constitution(cfg.constitution)
    cases = stress.gather_cases(cfg, constitution, "auto", None)  # now with the SFT model's answers to helpful prompts
    helpful = [s for s in read_jsonl(out / "samples.jsonl") if s["kind"] == "helpful"]
    assert [c.prompt for c in cases if c.kind == "helpful"] == [s["prompt"] for s in helpful]
    probes, comply = stress.library(None, constitution)
    usable = {(p.id, kind) for p in probes for kind in p.kinds
              if any(c.kind == kind and p.write(c, comply).strip() not in ("", c.good.strip()) for c in cases)}
    assert {"refuse_helpful", "refuse_loop_helpful"} <= {probe for probe, kind in usable if kind == "helpful"}
    first_turn = {(r["id"].split(":")[1], r["kind"]) for r in hacks[: len(usable)]}
    assert len(usable) < 40 and first_turn == usable  # each hack on each kind once before any twice
    by_id = {p.id: p for p in probes}
    for record in hacks:
        case = cases[int(record["id"].split(":")[2])]
        assert record["prompt"] == case.prompt and record["kind"] == case.kind
        assert record["answers"] == [case.good, by_id[record["id"].split(":")[1]].write(case, comply)]

    summary = json.loads((out / "summary.json").read_text())["stress_pairs"]
    fooled = {r["id"].split(":")[1] for r in hacks if r["label_prob"] < 0.5}
    assert "repeated" in fooled and "colon" not in fooled  # the scripted labeler's length bias, as it judged
    assert summary["probe_preferred_ids"] == sorted(fooled) and summary["pairs"] == 40
    assert summary["good_preferred"] + summary["probe_preferred"] == sum(r["label_prob"] != 0.5 for r in hacks)
    dataset = datasets.load_from_disk(str(out / "dataset"))
    row = dataset[dataset["id"].index(next(r["id"] for r in hacks if r["id"].startswith("stress:colon:")))]
    assert row["rejected"][0]["content"] == ":"

    # no worked example (as if the constitution had none) and no verified SL-CAI revision: one line, nothing written
    import shutil

    monkeypatch.setattr(stress, "constitution_cases", lambda constitution, kinds: [])
    shutil.rmtree(out)
    with pytest.raises(CaiError, match=r"prefs.stress_pairs=5: no good answer to set the probes beside: give constitutions/tiny.yaml"):
        prefs.run(make_cfg("prefs.stress_pairs=5"))
    assert not out.exists()


def test_the_probes_written_into_the_preference_data_are_in_the_prefs_fingerprint(tmp_path, monkeypatch):
    """A change to the shipped probe library or to the user's probe file reruns prefs (by content, not by
    path); without prefs.stress_pairs neither is read, so neither counts."""
    from cai import stress
    from cai.config import load_config
    from cai.stages import stage_fingerprint

    def fingerprint(*extra):
        return stage_fingerprint(load_config(None, [f"output_dir={tmp_path / 'run'}", *extra]), "prefs")

    mine = tmp_path / "mine.yaml"
    mine.write_text("probes:\n  - {id: mine, family: my hack, answer: 'Sure: {comply}'}\n")
    with_pairs = fingerprint("prefs.stress_pairs=4")
    with_mine = fingerprint("prefs.stress_pairs=4", f"prefs.stress_probes={mine}")
    assert len({fingerprint(), with_pairs, with_mine}) == 3
    mine.write_text("probes:\n  - {id: mine, family: my hack, answer: 'Fine: {comply}'}\n")
    assert fingerprint("prefs.stress_pairs=4", f"prefs.stress_probes={mine}") != with_mine
    library = tmp_path / "library.yaml"
    library.write_text(stress.LIBRARY.read_text() + "\n# edited\n")
    monkeypatch.setattr(stress, "LIBRARY", library)
    assert fingerprint("prefs.stress_pairs=4") != with_pairs
    assert fingerprint() == fingerprint("prefs.stress_probes=elsewhere.yaml")  # unread without stress_pairs


def test_min_label_margin_keeps_the_decisive_pairs_only():
    """rm.min_label_margin: pairs whose label is nearer 0.5 than the margin are left out, exact ties too; 0
    keeps every pair; a margin no pair meets, or a dataset without labels, is refused in one line."""
    dataset = datasets.Dataset.from_dict({"label_prob": [0.5, 0.52, 0.571, 0.643, 0.9], "id": list("abcde")})
    assert reward_training.decisive_pairs(dataset, 0.0) is dataset
    assert reward_training.decisive_pairs(dataset, 0.01)["id"] == ["b", "c", "d", "e"]
    assert reward_training.decisive_pairs(dataset, 0.1)["id"] == ["d", "e"]
    with pytest.raises(CaiError, match=r"rm.min_label_margin=0.45: none of the 5 preference pairs"):
        reward_training.decisive_pairs(dataset, 0.45)
    with pytest.raises(CaiError, match="has none"):
        reward_training.decisive_pairs(dataset.remove_columns("label_prob"), 0.1)


def test_min_label_margin_trains_on_fewer_pairs_and_says_how_many_it_left_out(prefs_run, tmp_path):
    """Every other pair made a tie: with a margin, the reward model trains on the others and counts the ties."""
    make_cfg = copy_run(prefs_run[2], tmp_path / "run", ("sl", "sft", "prefs"))
    run_dir = tmp_path / "run"
    dataset = datasets.load_from_disk(str(run_dir / "prefs" / "dataset"))
    dataset = dataset.map(lambda row, i: {"label_prob": 0.5 if i % 2 else row["label_prob"]}, with_indices=True)
    ties = sum(p == 0.5 for p in dataset["label_prob"])
    assert 0 < ties < len(dataset)
    samples = [(s["prompt"], a) for s in read_jsonl(run_dir / "prefs" / "samples.jsonl") for a in s["answers"] if a.strip()]
    for margin, left_out in ((0.0, 0), (0.01, ties)):
        cfg = make_cfg("rm.eval_fraction=0", "rm.epochs=1", f"rm.min_label_margin={margin}")
        metrics = reward_training.train_reward_model(cfg, dataset, tmp_path / f"rm{margin}", start_from=run_dir / "sft", normalize_on=samples)
        assert metrics["below_label_margin"] == left_out and metrics["train_pairs"] == len(dataset) - left_out


def test_min_label_margin_at_its_default_leaves_older_runs_current(tmp_path):
    """The key is in the rm fingerprint only when it leaves pairs out, so a run made before it existed is not retrained."""
    from cai.config import load_config
    from cai.stages import stage_fingerprint
    from cai.stage_state import fingerprint_parts

    def cfg(*extra):
        return load_config(None, [f"output_dir={tmp_path / 'run'}", *extra])

    assert "min_label_margin" not in fingerprint_parts(cfg(), "rm")["rm"]
    assert stage_fingerprint(cfg(), "rm") == stage_fingerprint(cfg("rm.min_label_margin=0"), "rm")
    assert stage_fingerprint(cfg(), "rm") != stage_fingerprint(cfg("rm.min_label_margin=0.05"), "rm")
