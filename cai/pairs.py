"""Answer pairs for AI preference labels: what the prefs stage and the RL stage's rounds of AI feedback
share (Bai et al. 2022, section 4.1; iterated: each round labels the current policy's own answers).

1. `sample_answers`: a policy samples K answers per prompt; one record per prompt is appended to
   `samples.jsonl` per batch, so a resumed run samples nothing twice.
2. `collect_pairs`: every two distinct, non-empty answers of one prompt; pairs with an empty answer
   or two identical answers are counted and left out. `probe_pairs` (prefs.stress_pairs): known reward
   hacks, the probes of `cai stress`, each beside a good answer to the same prompt, for the labeler to
   judge like any pair, so that the reward model learns them before PPO finds them.
3. `label_pairs`: the choice labeler judges pairs (`cai.preferences.judge_pairs`: principles drawn per
   pair, both orders, soft labels), a batch at a time; one record per pair is appended to
   `records.jsonl` as soon as its batch is labeled. `pending` leaves out the pairs already recorded.
4. `preference_rows`: the records as TRL's conversational preference rows (`prompt`, `chosen`,
   `rejected`) plus `label_prob`, P(chosen is better) >= 0.5; unlabeled pairs are left out.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from cai.chat import conversation, policy_input
from cai.errors import CaiError
from cai.labelers import GenerateRequest, labeler_config
from cai.preferences import PairItem, check_labeler_reads, judge_pairs, position_flip
from cai.promptsets import split_prompts
from cai.records import JsonlWriter, read_jsonl
from cai.templates import Templates


# --------------------------------------------------------------------------------------------------
# 1. Samples


def prefs_prompts(cfg) -> list:
    """The prefs split's prompts of the kinds asked for (prefs.include_red_team, prefs.include_helpful)."""
    split = split_prompts(cfg.data, cfg.seed)["prefs"]
    kinds = [k for k, on in (("red_team", cfg.prefs.include_red_team), ("helpful", cfg.prefs.include_helpful)) if on]
    if not kinds:
        raise CaiError("prefs: include_red_team and include_helpful are both false; there is nothing to label")
    prompts = [p for kind in kinds for p in split[kind]]
    if not prompts:
        raise CaiError(f"data: the prefs split has no {' or '.join(kinds)} prompts; add prompts or raise data.fractions.prefs")
    return prompts


def sample_answers(cfg, policy, prompts: list, templates: Templates, path: Path, source: str, tag: str = "prefs",
                   k: int | None = None) -> dict[str, dict]:
    """{prompt id: sample record} for every prompt: those in `path` already, the rest sampled by `policy`
    (a LocalGenerator or a policy server: `generate(requests)`) at prefs.temperature, K =
    prefs.samples_per_prompt answers each, and appended to `path`. `source` names the policy in the records."""
    sampled = {s["id"]: s for s in read_jsonl(path, repair=True)}
    todo = [p for p in prompts if p.id not in sampled]
    if not todo:
        return sampled
    k = k or cfg.prefs.samples_per_prompt
    sampling = dict(max_new_tokens=cfg.prefs.max_new_tokens or cfg.policy.max_new_tokens, temperature=cfg.prefs.temperature,
                    top_p=cfg.policy.top_p)
    per_batch = max(1, cfg.policy.batch_size // k)
    already = len(prompts) - len(todo)
    with JsonlWriter(path) as writer:
        for start in range(0, len(todo), per_batch):
            batch = todo[start : start + per_batch]
            print(f"[{tag}] sampling answers for prompts {already + start + 1}-{already + start + len(batch)} of {len(prompts)}")
            requests = [GenerateRequest(policy_input(templates, p.text, cfg.policy.system_prompt), sample_index=s, **sampling)
                        for p in batch for s in range(k)]
            answers = policy.generate(requests)
            for n, p in enumerate(batch):
                own = answers[n * k : (n + 1) * k]
                record = {"id": p.id, "kind": p.kind, "prompt": p.text, "answers": [a.text or "" for a in own],
                          "statuses": [a.status for a in own], "policy": source}
                writer.write(record)
                sampled[p.id] = record
    return sampled


# --------------------------------------------------------------------------------------------------
# 2. Pairs


def form_pairs(sample: dict) -> tuple[list[dict], dict]:
    """The pairs of one prompt's answers, and how many were skipped for an empty or repeated answer."""
    pairs, skipped = [], {"empty_answer": 0, "identical_answers": 0}
    for i, j in itertools.combinations(range(len(sample["answers"])), 2):
        first, second = sample["answers"][i], sample["answers"][j]
        if not first.strip() or not second.strip():
            skipped["empty_answer"] += 1
        elif first.strip() == second.strip():
            skipped["identical_answers"] += 1
        else:
            pairs.append({"id": f"{sample['id']}:{i}-{j}", "indices": [i, j], "first": first, "second": second})
    return pairs, skipped


def collect_pairs(prompts: list, sampled: dict[str, dict], id_prefix: str = "") -> tuple[list[dict], dict]:
    """Every prompt's pairs (ids prefixed by `id_prefix`, so that rounds never reuse a pair id), and the
    counts of pairs skipped."""
    pairs, skipped = [], {"empty_answer": 0, "identical_answers": 0}
    for p in prompts:
        own, dropped = form_pairs(sampled[p.id])
        for key in skipped:
            skipped[key] += dropped[key]
        pairs += [dict(pair, id=id_prefix + pair["id"], prompt_id=p.id, kind=p.kind, prompt=p.text) for pair in own]
    return pairs, skipped


def probe_pairs(cfg, constitution, count: int) -> list[dict]:
    """`count` pairs of (good answer, probe answer) for prefs.stress_pairs.

    The answers set beside the probes are `cai stress`'s cases: the constitution's worked examples, the
    verified SL-CAI revisions of the run and, once the prefs stage has sampled them, the SFT model's
    answers to its helpful prompts (an ordinary answer to an ordinary request, beside which the probes of
    over-refusal are put). The probes are the library's and `prefs.stress_probes`. Each probe is taken in
    turn for each kind it applies to, on its own seeded order of the cases of that kind, so that few pairs
    still cover every hack. Blank probes are left out (a pair needs two answers). Ids `stress:PROBE:N`;
    the label is the labeler's, never assumed."""
    import random

    from cai.stress import gather_cases, library

    probes, comply = library(cfg.prefs.stress_probes, constitution)
    try:
        cases = [c for c in gather_cases(cfg, constitution, "auto", None) if c.good.strip()]
    except CaiError:
        raise CaiError(f"prefs.stress_pairs={count}: no good answer to set the probes beside: give {cfg.constitution} "
                       "worked examples or run the sl stage with sl.verify_revisions (or set prefs.stress_pairs=0)") from None
    queues = []
    for probe in probes:
        for kind in probe.kinds:
            mine = [(n, c) for n, c in enumerate(cases) if c.kind == kind]
            random.Random(f"{cfg.seed}:stress-pairs:{probe.id}:{kind}").shuffle(mine)
            written = [(n, c, probe.write(c, comply)) for n, c in mine]
            written = [(n, c, a) for n, c, a in written if a.strip() and a.strip() != c.good.strip()]
            if written:
                queues.append((probe, written))
    pairs = []
    for turn in range(max((len(q) for _, q in queues), default=0)):
        for probe, queue in queues:
            if len(pairs) < count and turn < len(queue):
                n, case, answer = queue[turn]
                pairs.append({"id": f"stress:{probe.id}:{n}", "indices": None, "first": case.good, "second": answer,
                              "prompt_id": f"stress:{n}", "kind": case.kind, "prompt": case.prompt})
    return pairs


# --------------------------------------------------------------------------------------------------
# 3. Labels


def pending(pairs: list[dict], records_path: Path) -> list[dict]:
    """The pairs that have no record in `records_path` yet (a torn last line is cut off)."""
    labeled = {r["id"] for r in read_jsonl(records_path, repair=True)}
    return [pair for pair in pairs if pair["id"] not in labeled]


def label_pairs(cfg, labeler, todo: list[dict], constitution, templates: Templates, records_path: Path, total: int,
                tag: str = "prefs", extra: dict | None = None) -> None:
    """The labeler judges `todo`, `choice_labeler.batch_size` pairs a call; one record per pair is appended
    to `records_path` per batch (with `extra` fields). When almost every question of the first batch is
    unreadable, it stops there (`check_labeler_reads`), that batch unwritten."""
    per_call = max(1, labeler_config(cfg, "choices").batch_size)
    done = total - len(todo)
    with JsonlWriter(records_path) as writer:
        for start in range(0, len(todo), per_call):
            batch = todo[start : start + per_call]
            print(f"[{tag}] labeling pairs {done + start + 1}-{done + start + len(batch)} of {total}")
            items = [PairItem(pair["id"], conversation(pair["prompt"], None, cfg.policy.system_prompt), pair["first"], pair["second"])
                     for pair in batch]
            verdicts = judge_pairs(labeler, items, constitution, templates, cfg)
            if start == 0:
                check_labeler_reads(verdicts, labeler.id, labeler.usage.extra.get("choice_asked"), cfg.labeler.choice_method)
            for pair, verdict in zip(batch, verdicts):
                writer.write({
                    "id": pair["id"], "prompt_id": pair["prompt_id"], "kind": pair["kind"], "prompt": pair["prompt"],
                    "answers": [pair["first"], pair["second"]], "answer_indices": pair["indices"], **verdict.as_dict(),
                    "labeler": labeler.id, "chain_of_thought": cfg.prefs.chain_of_thought, **(extra or {}),
                })


# --------------------------------------------------------------------------------------------------
# 4. Preference rows


def to_preference_row(record: dict, templates: Templates, system_prompt: str | None) -> dict:
    """One record as a TRL conversational preference row; `label_prob` = P(chosen is better) >= 0.5.
    The prompt is the policy's input as it was sampled, so the reward model and DPO train on it."""
    p = record["label_prob"]
    first, second = record["answers"]
    chosen, rejected = (first, second) if p >= 0.5 else (second, first)
    return {
        "prompt": policy_input(templates, record["prompt"], system_prompt),
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "label_prob": max(p, 1.0 - p),
        "id": record["id"],
        "kind": record["kind"],
    }


def preference_rows(records: list[dict], templates: Templates, system_prompt: str | None) -> list[dict]:
    """The labeled records (status ok) as preference rows."""
    return [to_preference_row(r, templates, system_prompt) for r in records if r["status"] == "ok"]


def flip_rate(records: list[dict]) -> float | None:
    """Share of readable principle questions whose pick changed with the presentation order."""
    ok = [e for r in records for e in r["principles"] if e["status"] == "ok"]
    if not ok:
        return None
    return sum(position_flip(e["orders"]["ab"]["p_first"], e["orders"]["ba"]["p_first"]) for e in ok) / len(ok)
