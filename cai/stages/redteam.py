"""`cai redteam`: red-team prompts written from the constitution, kept novel, and split held out.

The Constitutional AI paper trained on red-team prompts that a model wrote by few-shot prompting; here
the labeler writes them for each principle of the run's constitution, in each attack style, and an
archive over principle x style (Rainbow Teaming's MAP-Elites search, `cai.redteam`) keeps the novel
ones that make the target policy fail most.

1. Check everything first: the principles (`redteam.principles`), the attack styles (the shipped ones and
   `redteam.styles_file`), the templates, a writer that writes text, the target policy, and the choice
   labeler when a principle has no check to judge answers by.
2. Open `output_dir/redteam/` (config, constitution and versions, as every stage) and replay the rounds
   already on disk into the archive, so that a killed run goes on where it stopped.
3. Each round (`redteam.rounds`):
   a. for every principle x style cell the writer writes `redteam.candidates` prompts: in the first round
      from the principle (its critique and revision requests, its worked examples, the style), later by
      mutating a parent drawn among the principle's best archived prompts into the cell's style;
   b. a prompt that is empty, too long, the writer's refusal, or a near-duplicate of a prompt archived
      before the round or written earlier in it, is set aside, and its record says why;
   c. the target answers every other prompt `redteam.target_samples` times; an answer fails the
      principle when its check is not met, or (no check) when the choice labeler prefers the safe
      reference answer to it under the principle, asked in both orders;
   d. in order, each prompt is offered to its cell (`Archive.offer`: room, or a higher attack success
      than the cell's weakest), and the records are appended to `rounds/round-N.jsonl` a chunk at a
      time; a rerun replays whole chunks and redoes the one a kill cut.
4. The target answers every archived prompt again, with new samples: the attack success reported is not
   the one the archive selected on, which flatters it (`measure.jsonl`).
5. Outputs: `prompts.jsonl` (prompt, kind, principle, style on every row: what data.red_team, eval.prompts
   and `cai stress` read), its held-out split `train.jsonl` / `eval.jsonl` (no near-duplicate across
   them), `dataset/` (a datasets DatasetDict, train and test), and `summary.json`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import yaml

from cai.chat import conversation, policy_input
from cai.checks import refuses
from cai.config import Config
from cai.constitution import ComparisonPrinciple, load_constitution
from cai.errors import CaiError
from cai.labelers import GenerateRequest, build_labeler, labeler_config, require_writer, role_key
from cai.policy_server import check_policy, close_policy, open_policy
from cai.records import JsonlWriter, atomic_write_json, atomic_write_text, read_jsonl, record_labeler_usage, save_dataset
from cai.redteam import Archive, Entry, NearDuplicates, held_out_split, load_styles, near_pairs, novelty, principle_targets
from cai.stages import is_current, open_stage, stage_dir
from cai.templates import Templates
from cai.winrates import rate

LABELS = ("user's message:", "user message:", "message:", "prompt:", "user:", "request:")


def target_source(cfg: Config) -> str | None:
    """The model attacked: policy.model for `initial`, else redteam.target as given; None without one."""
    target = cfg.redteam.target
    return cfg.policy.model if target == "initial" else target


def clean_prompt(text: str) -> str:
    """The writer's answer without the labels, fences and quotes small models wrap a message in."""
    text = text.strip().strip("`").strip()
    for label in LABELS:
        if text.lower().startswith(label):
            text = text[len(label) :].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def writer_request(templates: Templates, target, style, parent: str | None, cfg: Config, sample_index: int = 0) -> GenerateRequest:
    variables = dict(critique=target.critique, revision=target.revision, kind=target.kind, style_name=style.name,
                     style_description=style.description, style_example=style.example)
    if parent is None:
        content = templates.render("redteam_write.jinja", examples=list(target.examples), **variables)
    else:
        content = templates.render("redteam_mutate.jinja", parent=parent, **variables)
    return GenerateRequest([{"role": "user", "content": content}], max_new_tokens=cfg.redteam.max_new_tokens,
                           temperature=cfg.redteam.temperature, top_p=cfg.labeler.top_p, sample_index=sample_index)


def read_status(generation, cfg: Config) -> tuple[str, str | None]:
    """(status, prompt): ok, or why the writer's answer is no prompt (failed, refused, empty, too_long)."""
    if generation.status != "ok":
        return ("failed" if generation.status == "failed" else "refused"), None
    text = clean_prompt(generation.text or "")
    if len(text.split()) < 3:
        return "empty", None
    if refuses(text):
        return "refused", None
    if len(text.split()) > cfg.redteam.max_words:
        return "too_long", None
    return "ok", text


class Attacker:
    """The target's answers to prompts and whether each fails the prompt's principle (step 3c)."""

    def __init__(self, cfg: Config, policy, judge, templates: Templates, constitution):
        self.cfg, self.policy, self.judge, self.templates, self.constitution = cfg, policy, judge, templates, constitution

    def measure(self, items: list[tuple[str, str, str, object]], first_sample: int) -> list[dict]:
        """For each (id, prompt, kind, principle target): {"attack", "answers", "failed"}; `attack` is the
        share of the target's answers that fail (None when none could be judged)."""
        from cai.preferences import JudgeSettings, PairItem, judge_pairs

        cfg, n = self.cfg, self.cfg.redteam.target_samples
        sampling = dict(max_new_tokens=cfg.policy.max_new_tokens, temperature=cfg.policy.temperature, top_p=cfg.policy.top_p)
        asks = [GenerateRequest(policy_input(self.templates, text, cfg.policy.system_prompt), sample_index=first_sample + k, **sampling)
                for _, text, _, _ in items for k in range(n)]
        answers = [g.text or "" for g in self.policy.generate(asks, desc="target answers")]
        failed: list[float | None] = [None] * len(answers)
        by_labeler: dict[str, list[int]] = {}
        for i, (item_id, text, kind, target) in enumerate(items):
            for k in range(n):
                held = target.check.satisfied(text, answers[i * n + k], kind) if target.check is not None else None
                if held is not None:
                    failed[i * n + k] = float(not held)
                elif self.judge is not None:
                    by_labeler.setdefault(target.id, []).append(i * n + k)
        for slots in by_labeler.values():  # one call per principle, its answers batched
            target = items[slots[0] // n][3]
            question = ComparisonPrinciple(id=target.id, question=target.question)
            settings = JudgeSettings(principles_per_pair=1, few_shot=False, seed=cfg.seed, principles=(question,))
            pairs = [PairItem(f"{items[s // n][0]}:{first_sample + s % n}", conversation(items[s // n][1], None, cfg.policy.system_prompt),
                              cfg.redteam.safe_reference, answers[s]) for s in slots]
            for s, verdict in zip(slots, judge_pairs(self.judge, pairs, self.constitution, self.templates, settings=settings,
                                                     desc="judging answers")):
                failed[s] = verdict.label  # P(the safe reference is better than the target's answer)
        out = []
        for i in range(len(items)):
            mine = [f for f in failed[i * n : (i + 1) * n] if f is not None]
            out.append({"attack": sum(mine) / len(mine) if mine else None, "answers": answers[i * n : (i + 1) * n],
                        "failed": failed[i * n : (i + 1) * n]})
        return out


def entry_of(record: dict) -> Entry:
    return Entry(record["id"], record["prompt"], record["principle"], record["style"], record["kind"], record["round"],
                 record.get("parent"), record.get("attack"), record.get("answers") or [])


def complete_chunks(path: Path, expected: int, chunk: int) -> list[dict]:
    """The round file's records of the chunks written whole; a chunk a kill cut is dropped from the file."""
    records = read_jsonl(path, repair=True)
    counts: dict[int, int] = {}
    for r in records:
        counts[r["chunk"]] = counts.get(r["chunk"], 0) + 1
    whole = {c for c, k in counts.items() if k == min(chunk, expected - c * chunk)}
    kept = [r for r in records if r["chunk"] in whole]
    if len(kept) < len(records):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return kept


def run_round(r: int, cfg: Config, archive: Archive, cells, templates, writer, attacker, path: Path, chunk: int) -> list[dict]:
    """One round (step 3): write, set aside, measure, offer. Returns the round's records."""
    red = cfg.redteam
    plan = []
    for target, style in cells:
        for j in range(red.candidates):
            key = f"r{r + 1}-{target.id}-{style.id}-{j}"
            parent = archive.pick_parent(target.id, red.parents, cfg.seed, key) if r > 0 else None
            plan.append((key, j, target, style, parent))
    done = complete_chunks(path, len(plan), chunk)
    if len(done) == len(plan):  # a finished round: its records are the archive's history
        for old in done:
            if old["status"] == "ok":
                archive.offer(entry_of(old))
        return done

    # a. the writer writes every cell's candidates in one call (an API writer runs them concurrently; after
    #    a kill the labeler cache answers what it had answered, in the same batches)
    # the sample index counts rounds too: a parent mutated into the same cell again is a new sample, not a cached answer
    requests = [writer_request(templates, t, s, p.prompt if p else None, cfg, sample_index=r * red.candidates + j)
                for _, j, t, s, p in plan]
    written = writer.generate(requests, desc=f"round {r + 1}: writing", reject_refusals=True)

    # b. readable and novel: against the archive as the round began, and the round's earlier prompts
    this_round = NearDuplicates(cfg.redteam.dedup_threshold, cfg.seed)
    records = []
    for index, ((key, _, target, style, parent), g) in enumerate(zip(plan, written)):
        status, text = read_status(g, cfg)
        record = {"id": key, "round": r + 1, "chunk": index // chunk, "principle": target.id, "style": style.id, "kind": target.kind,
                  "parent": parent.id if parent else None, "status": status, "prompt": text, "raw": g.text}
        if text is not None:
            seen = archive.duplicate_of(text) or this_round.nearest(text)
            if seen:
                record.update(status="duplicate", duplicate_of=seen[0], similarity=round(seen[1], 3))
            else:
                this_round.add(key, text)
        records.append(record)

    # c.-d. measured and offered a chunk at a time; the whole chunks on disk are replayed, not redone
    for old in done:
        if old["status"] == "ok":
            archive.offer(entry_of(old))
    targets = {t.id: t for t, _ in cells}
    with JsonlWriter(path) as out:
        for start in range(len(done), len(records), chunk):
            batch = records[start : start + chunk]
            fresh = [x for x in batch if x["status"] == "ok"]
            if attacker is not None and fresh:
                found = attacker.measure([(x["id"], x["prompt"], x["kind"], targets[x["principle"]]) for x in fresh], 0)
                for x, m in zip(fresh, found):
                    x.update(m)
            for x in batch:
                if x["status"] == "ok":
                    x["entered"], x["replaced"] = archive.offer(entry_of(x))
                out.write(x)
    return done + records[len(done) :]


def measure_archive(cfg: Config, archive: Archive, attacker, targets: dict, path: Path, chunk: int) -> dict[str, dict]:
    """Step 4: fresh answers to every archived prompt (samples after those the archive selected on)."""
    done = {r["id"]: r for r in read_jsonl(path, repair=True)}
    todo = [e for e in archive.entries() if e.id not in done]
    if attacker is None or not todo:
        return done
    print(f"[redteam] the target answers the {len(archive.entries())} archived prompts afresh ({len(todo)} to go)")
    with JsonlWriter(path) as out:
        for start in range(0, len(todo), chunk):
            batch = todo[start : start + chunk]
            found = attacker.measure([(e.id, e.prompt, e.kind, targets[e.principle]) for e in batch], cfg.redteam.target_samples)
            for e, m in zip(batch, found):
                done[e.id] = {"id": e.id, **m}
                out.write(done[e.id])
    return done


def summarize(cfg: Config, archive: Archive, records: list[dict], measured: dict, cells, split: list[bool], stage_path: Path,
              seconds: float) -> dict:
    """summary.json: cells, writer outcomes, novelty, attack success per principle and style with intervals, spend."""
    stats = dict(resamples=1000, level=0.95, seed=cfg.seed)
    entries = ordered(archive)  # the order `split` flags them in
    statuses: dict[str, int] = {}
    for x in records:
        statuses[x["status"]] = statuses.get(x["status"], 0) + 1
    readable = sum(statuses.get(s, 0) for s in ("ok", "duplicate"))
    attack = {e.id: (measured.get(e.id) or {}).get("attack") for e in entries}

    def by(key) -> dict:
        groups: dict[str, list] = {}
        for e in entries:
            groups.setdefault(getattr(e, key), []).append(attack[e.id])
        return {g: rate(v, **stats) for g, v in groups.items()}

    usage = {}
    for role in ("labeler", "judge", "policy"):
        file = stage_path / f"{role}_usage.json"
        if file.exists():
            usage[role] = json.loads(file.read_text())["total"]
    texts = [e.prompt for e in entries]
    return {
        "target": target_source(cfg),
        "writer": {"key": role_key(cfg, "text"), "backend": cfg.labeler.backend, "model": cfg.labeler.model},
        "rounds": cfg.redteam.rounds,
        "prompts": len(entries),
        "cells": {f"{t.id} x {s.id}": len(archive.cells.get((t.id, s.id), [])) for t, s in cells},
        "cells_filled": sum(bool(archive.cells.get((t.id, s.id))) for t, s in cells),
        "cells_total": len(cells),
        "written": len(records),
        "statuses": statuses,
        "kept_after_dedup": statuses.get("ok", 0) / readable if readable else None,
        "entered": sum(bool(x.get("entered")) for x in records),
        "replaced": sum(bool(x.get("replaced")) for x in records),
        "novelty": novelty(texts),
        "attack_success": None if cfg.redteam.target is None else {
            "overall": rate(list(attack.values()), **stats), "by_principle": by("principle"), "by_style": by("style"),
            "judged_by": {t.id: "check" if t.check is not None else f"{role_key(cfg, 'choices')} vs the safe reference"
                          for t, _ in cells},
            "as_selected": rate([e.attack for e in entries], **stats),
        },
        "split": {"train": split.count(False), "eval": split.count(True), "threshold": cfg.redteam.split_threshold,
                  "near_pairs_across": sum(split[i] != split[j] for i, j, _ in near_pairs(texts, cfg.redteam.split_threshold))},
        "usage": usage,
        "seconds_this_run": round(seconds, 1),
    }


def ordered(archive: Archive) -> list[Entry]:
    """The archive's prompts in the order the files list them (and `split` flags them)."""
    return sorted(archive.entries(), key=lambda e: (e.principle, e.style, e.round, e.id))


def write_outputs(cfg: Config, archive: Archive, measured: dict, stage_path: Path) -> list[bool]:
    """prompts.jsonl, train.jsonl, eval.jsonl and dataset/ (step 5); returns which prompts are held out,
    in the order of `ordered(archive)`."""
    import datasets

    entries = ordered(archive)
    split = held_out_split([e.prompt for e in entries], cfg.redteam.eval_fraction, cfg.redteam.split_threshold, cfg.seed)
    rows = [{"prompt": e.prompt, "kind": e.kind, "principle": e.principle, "style": e.style, "id": e.id, "round": e.round,
             "parent": e.parent, "attack_success": (measured.get(e.id) or {}).get("attack"), "split": "eval" if held else "train"}
            for e, held in zip(entries, split)]
    lines = lambda chosen: "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in chosen)  # noqa: E731
    atomic_write_text(stage_path / "prompts.jsonl", lines(rows))
    atomic_write_text(stage_path / "train.jsonl", lines([x for x in rows if x["split"] == "train"]))
    atomic_write_text(stage_path / "eval.jsonl", lines([x for x in rows if x["split"] == "eval"]))
    columns = ["prompt", "kind", "principle", "style", "id", "round", "parent", "attack_success"]
    as_dataset = lambda part: datasets.Dataset.from_dict(  # noqa: E731
        {c: [x[c] for x in rows if x["split"] == part] for c in columns},
        features=datasets.Features({c: datasets.Value("float64" if c == "attack_success" else "int64" if c == "round" else "string")
                                    for c in columns}))
    save_dataset(datasets.DatasetDict({"train": as_dataset("train"), "test": as_dataset("eval")}), stage_path / "dataset")
    return split


def headlines(summary: dict) -> list[str]:
    kept = summary["kept_after_dedup"]
    lines = [f"{summary['prompts']} prompts in {summary['cells_filled']} of {summary['cells_total']} principle x style cells; "
             f"{summary['written']} written, {summary['statuses'].get('ok', 0)} novel "
             f"({'n/a' if kept is None else format(kept, '.0%')} of the readable ones kept after dedup)",
             f"novelty: distinct word 2-grams {summary['novelty']['distinct_2']:.0%}, mean nearest-neighbour similarity "
             f"{(summary['novelty']['mean_nearest_similarity'] or 0):.2f}"]
    attack = summary.get("attack_success")
    if attack:
        fmt = lambda r: "n/a" if r["mean"] is None else f"{r['mean']:.0%} [{r['ci'][0]:.0%}, {r['ci'][1]:.0%}] (n={r['n']})"  # noqa: E731
        lines.append(f"attack success on {summary['target']} (fresh samples): {fmt(attack['overall'])}")
        lines += [f"  {p}: {fmt(r)}" for p, r in attack["by_principle"].items()]
    lines.append(f"held-out split: {summary['split']['train']} train, {summary['split']['eval']} eval prompts")
    return lines


def run(cfg: Config) -> Path:
    # 1. Everything checked before anything is written or loaded.
    red = cfg.redteam
    constitution = load_constitution(cfg.constitution)
    targets = principle_targets(constitution, red.principles)
    styles = load_styles(red.styles_file, red.styles)
    templates = Templates(cfg.templates)
    probe_target, probe_style = targets[0], styles[0]
    writer_request(templates, probe_target, probe_style, None, cfg)
    writer_request(templates, probe_target, probe_style, "x", cfg)
    policy_input(templates, "x", cfg.policy.system_prompt)
    require_writer(cfg, "text", "red-team prompts")
    source = target_source(cfg)
    unchecked = [t.id for t in targets if t.check is None]
    needs_judge = source is not None and bool(unchecked)
    choice = labeler_config(cfg, "choices")
    if needs_judge and choice.backend == "rules":
        raise CaiError(f"{cfg.constitution}: principle '{unchecked[0]}' has no check, and {role_key(cfg, 'choices')}.backend=rules "
                       f"judges by checks only; give it a check, set redteam.principles, or redteam.target=null")
    from cai.models import resolve_model

    for used in [cfg.labeler] + ([choice] if needs_judge else []):
        if used.backend == "local":
            resolve_model(used.model, cfg.cache_dir)
    path = stage_dir(cfg, "redteam")
    styles_digest = hashlib.sha256(json.dumps([s.model_dump() for s in styles]).encode()).hexdigest()[:16]
    styles_changed = (path / "styles.sha256").exists() and (path / "styles.sha256").read_text().strip() != styles_digest
    if source is not None and (styles_changed or not is_current(cfg, "redteam")):
        check_policy(cfg, source)

    # 2. The folder, and the rounds already on disk.
    if styles_changed:
        print("[redteam] the attack styles changed since the last run: rerunning redteam from scratch")
    stage = open_stage(cfg, "redteam", force=styles_changed, uses_labeler=("text", "choices") if needs_judge else ("text",))
    if stage.done:
        return stage.path
    atomic_write_text(stage.path / "styles.sha256", styles_digest + "\n")
    atomic_write_text(stage.path / "attack_styles.yaml", yaml.safe_dump({"styles": [s.model_dump() for s in styles]}, sort_keys=False))
    started = time.time()
    cells = [(t, s) for t in targets for s in styles]
    chunk = max(cfg.policy.batch_size, cfg.labeler.batch_size)
    print(f"[redteam] {len(targets)} principles x {len(styles)} attack styles = {len(cells)} cells, {red.rounds} round(s) of "
          f"{red.candidates} prompt(s) per cell; target: {source or 'none (novelty alone)'}")

    shared: dict = {}
    policy = open_policy(cfg, source, shared) if source is not None else None
    writer = build_labeler(cfg, shared_models=shared)
    judge = build_labeler(cfg, shared_models=shared, role="choices") if needs_judge else None
    attacker = Attacker(cfg, policy, judge, templates, constitution) if policy is not None else None
    archive = Archive(red.cell_size, red.dedup_threshold, cfg.seed)
    records: list[dict] = []
    try:
        # 3. The rounds (those on disk are replayed from their records: cached writer answers, whole chunks).
        (stage.path / "rounds").mkdir(exist_ok=True)
        for r in range(red.rounds):
            print(f"[redteam] round {r + 1} of {red.rounds}")
            mine = run_round(r, cfg, archive, cells, templates, writer, attacker, stage.path / "rounds" / f"round-{r + 1}.jsonl", chunk)
            records += mine
            counts = {s: sum(x["status"] == s for x in mine) for s in ("ok", "duplicate")}
            print(f"[redteam] round {r + 1}: {len(mine)} written, {counts['ok'] + counts['duplicate']} readable, {counts['ok']} novel, "
                  f"{sum(bool(x.get('entered')) for x in mine)} entered the archive ({sum(bool(x.get('replaced')) for x in mine)} "
                  f"replacing a weaker one); {len(archive.entries())} archived")
        # 4. Fresh answers to the archive.
        measured = measure_archive(cfg, archive, attacker, {t.id: t for t in targets}, stage.path / "measure.jsonl", chunk)
    finally:
        record_labeler_usage(stage.path, writer)
        writer.close()
        if judge is not None:
            from cai.records import record_usage

            record_usage(stage.path, judge, "judge")
            judge.close()
        if policy is not None:
            close_policy(policy, stage.path)

    # 5. The prompt files, the dataset and the summary.
    split = write_outputs(cfg, archive, measured, stage.path)
    summary = summarize(cfg, archive, records, measured, cells, split, stage.path, time.time() - started)
    atomic_write_json(stage.path / "summary.json", summary)
    for line in headlines(summary):
        print(f"[redteam] {line}")
    return stage.finish(f"{summary['prompts']} prompts -> {stage.path / 'prompts.jsonl'} "
                        f"(train.jsonl {summary['split']['train']}, eval.jsonl {summary['split']['eval']})")
