"""Keep the best RL snapshot, chosen by a judge that training never used on prompts that neither training
nor the evaluation sees. A reward model's score keeps rising after what it stands for has turned (Gao et
al. 2022; the known-truth benchmark's PPO): an independent judge on a validation split finds the turn,
and the held-out eval split stays untouched, so the eval stage's numbers are not selected on.

With `rl.select_by=validation`, once the rl stage has trained:

1. Prompts: the val split (`data.fractions.val`), disjoint from sl, prefs, rl and eval. Nothing here
   reads the eval split.
2. Candidates: every policy snapshot in `rl/snapshots/step-N` (`rl.keep_snapshots`, the end of each
   round, and the final policy).
3. The SL-CAI model and each candidate answer every val prompt (`eval.temperature`,
   `eval.max_new_tokens`; seeded by the prompt, so every candidate samples with the same randomness)
   -> `rl/selection/answers.jsonl`, appended per batch.
4. The judge (`eval.judge`) compares each candidate's answer with the SL-CAI model's under the
   constitution's comparison principles, both orders (`cai.judging.judge_comparisons`)
   -> `rl/selection/judgements.jsonl`; what it spent -> `rl/selection/labeler_usage.json`.
5. Each candidate's score is its soft win rate against the SL-CAI model, with a bootstrap interval
   over prompts; the highest is kept (a tie goes to the earlier step, nearer the reference) and its
   weights are copied into `rl/` -> `rl/selection.json`.

A killed selection resumes: answers and judgements on disk are not asked for again.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

from cai.errors import CaiError
from cai.records import JsonlWriter, atomic_write_json, read_jsonl, record_labeler_usage

REFERENCE = "sft"
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json")


def val_prompts(cfg) -> list:
    """The val split's prompts (red-team, then helpful)."""
    from cai.promptsets import split_prompts

    split = split_prompts(cfg.data, cfg.seed)["val"]
    return split["red_team"] + split["helpful"]


def check_selection(cfg) -> None:
    """Before the rl stage writes anything: a val split, and an eval.judge that did not train the policy."""
    from cai.labelers import circular_judge

    if cfg.rl.select_by != "validation":
        return
    if not cfg.data.fractions.get("val"):
        raise CaiError("rl.select_by=validation needs a validation split: give data.fractions a val share "
                       "(e.g. {sl: 0.4, prefs: 0.3, rl: 0.15, val: 0.05, eval: 0.1})")
    if not val_prompts(cfg):
        raise CaiError("rl.select_by=validation: the val split has no prompts; raise data.fractions.val or data.limit")
    if cfg.eval.judge is None or circular_judge(cfg):
        raise CaiError("rl.select_by=validation needs an eval.judge that training never used "
                       "(e.g. eval.judge.backend=rules, or another model than choice_labeler)")


def judge_signature(cfg) -> dict:
    """What decides the judge's verdicts: its labeler config less the keys that only change speed or cost."""
    from cai.labelers import labeler_config
    from cai.stages import OPERATIONAL_KEYS

    return {k: v for k, v in labeler_config(cfg, "judge").model_dump(mode="json").items() if k not in OPERATIONAL_KEYS["labeler"]}


def selection_stale(cfg, rl_dir: Path) -> bool:
    """The kept snapshot was chosen by another judge than eval.judge now is (the rl stage's fingerprint
    leaves eval.* out, so a finished stage chooses again rather than train again)."""
    path = Path(rl_dir) / "selection" / "judge.json"
    return cfg.rl.select_by == "validation" and path.exists() and json.loads(path.read_text()) != judge_signature(cfg)


def snapshot_steps(rl_dir: Path) -> list[int]:
    folder = Path(rl_dir) / "snapshots"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*")) if folder.is_dir() else []


def candidate_name(step: int) -> str:
    return f"rl@step-{step}"


def write_answers(cfg, sources: dict[str, str], prompts: list, path: Path) -> dict:
    """Every model in `sources` ({name: folder}) answers every prompt not answered yet; {(name, id): answer}."""
    from cai.chat import policy_input
    from cai.labelers import GenerateRequest
    from cai.labelers.local import LocalGenerator
    from cai.models import load_model_and_tokenizer
    from cai.templates import Templates

    done = {(r["model"], r["id"]): r["answer"] for r in read_jsonl(path, repair=True)}
    templates = Templates(cfg.templates)
    sampling = dict(max_new_tokens=cfg.eval.max_new_tokens or cfg.policy.max_new_tokens, temperature=cfg.eval.temperature,
                    top_p=cfg.policy.top_p)
    with JsonlWriter(path) as writer:
        for name, source in sources.items():
            todo = [p for p in prompts if (name, p.id) not in done]
            if not todo:
                continue
            print(f"[rl] selection: {name} answers {len(todo)} validation prompts")
            model, tokenizer = load_model_and_tokenizer(source, cfg, None)
            generator = LocalGenerator(model, tokenizer, cfg.policy.batch_size, cfg.seed, cfg.policy.system_prompt)
            for start in range(0, len(todo), cfg.policy.batch_size):
                batch = todo[start : start + cfg.policy.batch_size]
                generations = generator.generate([GenerateRequest(policy_input(templates, p.text, cfg.policy.system_prompt), **sampling)
                                                  for p in batch])
                for p, g in zip(batch, generations):
                    done[name, p.id] = g.text or ""
                    writer.write({"model": name, "id": p.id, "kind": p.kind, "prompt": p.text, "answer": g.text or ""})
            del generator, model
            gc.collect()
    return done


def score_candidates(cfg, judgements: list[dict], candidates: list[str]) -> list[dict]:
    """Each candidate's soft win rate against the SL-CAI model on the val prompts, with its interval."""
    from cai.winrates import win_rates

    out = []
    for name in candidates:
        result = win_rates(judgements, name, REFERENCE, cfg.eval.bootstrap, cfg.eval.confidence, cfg.seed)["overall"]
        out.append({"model": name, "step": int(name.split("-")[1]), "n": result["n"], "score": result["soft_win_rate"],
                    "ci": result["soft_ci"], "win_rate": result["win_rate"]})
    return out


def best(scored: list[dict]) -> dict:
    """The candidate with the highest score; a tie goes to the earlier step (nearer the reference)."""
    ranked = [s for s in scored if s["score"] is not None]
    if not ranked:
        raise CaiError("rl.select_by=validation: the judge gave no readable verdict on any validation pair")
    return min(ranked, key=lambda s: (-s["score"], s["step"]))


def keep(snapshot: Path, rl_dir: Path) -> None:
    """Copy the snapshot's weights and model config into rl/ (each file written beside, then renamed)."""
    for pattern in WEIGHT_FILES:
        for old in Path(rl_dir).glob(pattern):
            if not (snapshot / old.name).exists():
                old.unlink()
        for new in snapshot.glob(pattern):
            tmp = Path(rl_dir) / f".{new.name}.tmp"
            shutil.copyfile(new, tmp)
            os.replace(tmp, Path(rl_dir) / new.name)


def select_snapshot(cfg, rl_dir: Path) -> dict:
    """Steps 1-5: score every snapshot on the val split, copy the best into `rl_dir`; rl/selection.json."""
    from cai.constitution import load_constitution
    from cai.judging import judge_comparisons
    from cai.labelers import build_labeler, labeler_config
    from cai.stages import stage_dir
    from cai.templates import Templates

    rl_dir = Path(rl_dir)
    steps = snapshot_steps(rl_dir)
    if not steps:
        raise CaiError(f"rl.select_by=validation: {rl_dir / 'snapshots'} holds no snapshot to choose from")
    prompts = val_prompts(cfg)
    folder = rl_dir / "selection"
    candidates = [candidate_name(s) for s in steps]
    sources = {REFERENCE: str(stage_dir(cfg, "sft")), **{candidate_name(s): str(rl_dir / "snapshots" / f"step-{s}") for s in steps}}
    answers = write_answers(cfg, sources, prompts, folder / "answers.jsonl")

    judgements_path = folder / "judgements.jsonl"
    if selection_stale(cfg, rl_dir):  # another judge's verdicts: asked again
        judgements_path.unlink(missing_ok=True)
        (folder / "labeler_usage.json").unlink(missing_ok=True)
    atomic_write_json(folder / "judge.json", judge_signature(cfg))
    judged = {r["id"] for r in read_jsonl(judgements_path, repair=True)}
    todo = [(p, "val", c, REFERENCE) for c in candidates for p in prompts if f"{p.id}:{c}>{REFERENCE}" not in judged]
    if todo:
        judge_cfg = labeler_config(cfg, "judge")
        judge = build_labeler(cfg, role="judge")
        try:
            judge_comparisons(cfg, judge, judge_cfg, load_constitution(cfg.constitution), Templates(cfg.templates), answers, todo,
                              judgements_path)
        finally:
            record_labeler_usage(folder, judge)
            judge.close()
    judgements = read_jsonl(judgements_path)
    scored = score_candidates(cfg, judgements, candidates)
    kept = best(scored)
    keep(rl_dir / "snapshots" / f"step-{kept['step']}", rl_dir)
    usage = json.loads((folder / "labeler_usage.json").read_text()) if (folder / "labeler_usage.json").exists() else {}
    selection = {
        "kept": kept["model"], "step": kept["step"], "final_step": steps[-1],
        "reason": f"highest soft win rate against the SL-CAI model on {len(prompts)} validation prompts, judged by {usage.get('labeler')}",
        "judge": usage.get("labeler"),
        "prompts": len(prompts), "candidates": scored, "labeler_usage": usage.get("total"),
    }
    atomic_write_json(rl_dir / "selection.json", selection)
    ci = kept["ci"] or (kept["score"], kept["score"])
    print(f"[rl] kept {kept['model']}: soft win rate {kept['score']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] against the SL-CAI model on "
          f"{len(prompts)} validation prompts (" + ", ".join(f"step {s['step']}: {s['score']:.2f}" for s in scored if s["score"] is not None) + ")")
    return selection
