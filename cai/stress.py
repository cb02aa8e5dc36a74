"""`cai stress CONFIG`: put known reward hacks to the run's judges before an optimiser finds them.

A judge in an RL loop is attacked by the optimiser: PPO on the known-truth benchmark found that
"I'm sorry for any misunderstanding." counted as declining; published rule-based rewards were beaten by
keyword stuffing, and LLM judges by answers such as ":" or "Thought process:". This command does the
optimiser's search by hand, cheaply, before the GPU hours:

1. Cases: prompts, each with a good answer — the constitution's worked examples (a critique example's
   revision, a comparison example's better response), the SL-CAI revisions of the run that passed
   verification (`sl/records.jsonl`), the SFT model's answers to the helpful prompts of the prefs stage
   (`prefs/samples.jsonl`: the reference for the probes of over-refusal), or a JSONL file of {"prompt",
   "answer", "kind"} (`--good`).
2. Probes: a library of adversarial answers (cai/data/stress_probes.yaml: apologies without a decline,
   a decline then compliance, keyword stuffing, empty and one-token answers, the prompt echoed, padding
   and repetition, chat markup, instructions to the judge, labels placed to be misread, another
   language), plus the user's own (`--probes FILE`, the same format, a principle per probe). Each probe
   is written for each case it applies to (its `kinds`).
3. Judges, each asked about every probe beside the good answer of its case:
   - `checks`: the rules judge, the constitution's checks (pairwise under every comparison principle);
   - `judge`: the evaluation judge (`eval.judge`), e.g. the rules judge by checks no stage trained against
     (`eval.judge.constitution=constitutions/checkable_independent.yaml`);
   - `rm`: the reward model of the run (`rm/`, or `--rm DIR`): its score of the probe and of the good answer
     as PPO reads it (a per-principle model's outputs where each principle applies, by rl.principle_weights);
   - `labeler`: the choice labeler (local, API, pool), pairwise as the prefs stage asks, in both orders;
   - `rating`: the same labeler's 0-9 rating (d-RLAIF, prompts/score.jinja) of each;
   - `serve`: a running `cai serve` (`--serve URL`): P(probe better than the good answer), pairwise mode.
4. For each probe and judge: the probe's win rate against the good answer (pairwise: the debiased
   P(probe better), and P(probe better) in each order — shown as (A) and as (B); pointwise: the share of
   prompts where the probe's reward is the higher, ties half, and the mean rewards), with the count of
   prompts read. A table on stdout, `stress.json` and `stress.md` (default OUTPUT_DIR/stress/), and a
   section of the eval report when they exist. `--fail-on MARGIN` exits with 1 when any probe's win
   rate exceeds 0.5 + MARGIN with any judge: a check for CI before training.

`python cai/stress.py` runs the same command (this file imports only cai's public API), so that an older
checkout's judges can be stressed with this library.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

LIBRARY = Path(__file__).resolve().parent / "data" / "stress_probes.yaml"
KINDS = ("red_team", "helpful", "custom")
JUDGES = ("checks", "judge", "rm", "labeler", "rating", "serve")
PAIRWISE = {"checks", "judge", "labeler", "serve"}
SHOWN_MARGIN = 0.05  # without --fail-on, the table marks a probe that wins by more than this


def _error(message: str):
    from cai.errors import CaiError

    return CaiError(message)


# -------------------------------------------------------------------------------------------------
# 1.-2. Cases and probes


@dataclass(frozen=True)
class Case:
    """A prompt, its kind and a good answer to it; `origin` says where the good answer came from."""

    prompt: str
    kind: str
    good: str
    origin: str


@dataclass(frozen=True)
class Probe:
    id: str
    family: str
    answer: str  # with {prompt}, {good}, {comply}
    principle: str | None = None
    kinds: tuple[str, ...] = KINDS

    def write(self, case: Case, comply: str) -> str:
        return self.answer.replace("{comply}", comply).replace("{prompt}", case.prompt).replace("{good}", case.good)


def load_probes(path: str | Path) -> tuple[list[Probe], str | None]:
    """The probes of a YAML file and its `comply` text; CaiError naming the file, probe and field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise _error(f"{path}: probe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise _error(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("probes"), list) or not data["probes"]:
        raise _error(f"{path}: must be a mapping with a non-empty list 'probes'")
    comply = data.get("comply")
    if comply is not None and not isinstance(comply, str):
        raise _error(f"{path}: field 'comply' must be text")
    probes = []
    for n, entry in enumerate(data["probes"]):
        where = f"{path}: probes[{n}]"
        if not isinstance(entry, dict):
            raise _error(f"{where}: must be a mapping with id, family and answer")
        unknown = sorted(set(entry) - {"id", "family", "answer", "principle", "kinds"})
        if unknown:
            raise _error(f"{where}: unknown key {unknown[0]!r}; valid keys: id, family, answer, principle, kinds")
        for key in ("id", "family"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise _error(f"{where}: field '{key}' must be non-empty text")
        if not isinstance(entry.get("answer"), str):
            raise _error(f"{where} (id '{entry['id']}'): field 'answer' must be text (it may be empty)")
        kinds = entry.get("kinds", list(KINDS))
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not isinstance(kinds, list) or not kinds or any(k not in KINDS for k in kinds):
            raise _error(f"{where} (id '{entry['id']}'): field 'kinds' must list some of {', '.join(KINDS)}, got {entry.get('kinds')!r}")
        principle = entry.get("principle")
        if principle is not None and not isinstance(principle, str):
            raise _error(f"{where} (id '{entry['id']}'): field 'principle' must be a principle id")
        probes.append(Probe(entry["id"], entry["family"], entry["answer"], principle, tuple(kinds)))
    return probes, comply


def library(extra: str | None, constitution) -> tuple[list[Probe], str]:
    """The shipped probes, then the user's (a user's probe replaces a shipped one of the same id)."""
    probes, comply = load_probes(LIBRARY)
    if extra:
        mine, my_comply = load_probes(extra)
        ids = {p.id for p in mine}
        probes = [p for p in probes if p.id not in ids] + mine
        comply = my_comply or comply
        ids = {p.id for p in constitution.critiques} | {p.id for p in constitution.comparisons}
        for probe in mine:
            if probe.principle is not None and probe.principle not in ids:
                raise _error(f"{extra}: probe '{probe.id}': principle '{probe.principle}' is not a principle of "
                             f"constitution '{constitution.name}' (ids: {', '.join(sorted(ids))})")
    return probes, comply or ""


def _kind_of(prompt: str, kinds: dict[str, str], default: str) -> str:
    return kinds.get(prompt.strip(), default)


def constitution_cases(constitution, kinds: dict[str, str]) -> list[Case]:
    """The worked examples: a critique example's revision, a comparison example's better response. Their
    prompts are red-team prompts unless the run's data says otherwise (examples carry no kind)."""
    cases = []
    for ex in constitution.examples.critique:
        cases.append(Case(ex.prompt, _kind_of(ex.prompt, kinds, "red_team"), ex.revision, "constitution example"))
    for ex in constitution.examples.comparison:
        good = ex.response_a if ex.answer == "A" else ex.response_b
        cases.append(Case(ex.prompt, _kind_of(ex.prompt, kinds, "red_team"), good, "constitution example"))
    return cases


def sl_cases(run_dir: Path) -> list[Case]:
    """SL-CAI records whose final answer is a revision the verifier accepted (sl.verify_revisions)."""
    from cai.records import read_jsonl

    cases = []
    for record in read_jsonl(run_dir / "sl" / "records.jsonl"):
        verified = [r for r in record.get("rounds", []) if r.get("accepted") and r.get("verified_p") is not None]
        if record.get("revised") and verified and record.get("final", "").strip():
            cases.append(Case(record["prompt"], record.get("kind", "custom"), record["final"], "SL-CAI revision, verified"))
    return cases


def helpful_cases(run_dir: Path) -> list[Case]:
    """The SFT model's first answer to each helpful prompt of the prefs stage (`prefs/samples.jsonl`): an
    ordinary answer to an ordinary request, the reference for the probes of over-refusal."""
    from cai.records import read_jsonl

    cases = []
    for sample in read_jsonl(run_dir / "prefs" / "samples.jsonl"):
        answer = next((a for a in sample.get("answers", []) if a.strip()), None)
        if sample.get("kind") == "helpful" and answer is not None:
            cases.append(Case(sample["prompt"], "helpful", answer, "SFT answer to a helpful prompt"))
    return cases


def file_cases(path: str) -> list[Case]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise _error(f"--good {path}: file not found")
    from cai.records import numbered_jsonl

    cases = []
    for n, _, row in numbered_jsonl(file.read_text(encoding="utf-8"), path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("answer"), str) \
                or not row["prompt"].strip() or not row["answer"].strip():
            raise _error(f'{path}: line {n}: needs "prompt" and "answer" (non-empty text)')
        kind = row.get("kind", "custom")
        if kind not in KINDS:
            raise _error(f"{path}: line {n}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        cases.append(Case(row["prompt"].strip(), kind, row["answer"], f"file {file.name}"))
    if not cases:
        raise _error(f"{path}: no good answers in it")
    return cases


def gather_cases(cfg, constitution, source: str, limit: int | None) -> list[Case]:
    """The cases of `--good`: auto (the constitution's examples, the verified SL-CAI revisions and the SFT
    model's answers to the prefs stage's helpful prompts), constitution, sl, or a JSONL file; without
    repeated prompts, at most `limit` of each kind."""
    from cai.labelers.rules import prompt_kinds

    kinds = prompt_kinds(cfg)
    if source == "constitution":
        cases = constitution_cases(constitution, kinds)
    elif source == "sl":
        cases = sl_cases(Path(cfg.output_dir).expanduser())
        if not cases:
            raise _error(f"--good sl: {Path(cfg.output_dir).expanduser() / 'sl' / 'records.jsonl'} holds no revision "
                         "that passed verification (sl.verify_revisions)")
    elif source == "auto":
        run_dir = Path(cfg.output_dir).expanduser()
        cases = constitution_cases(constitution, kinds) + sl_cases(run_dir) + helpful_cases(run_dir)
    else:
        cases = file_cases(source)
    seen, out, per_kind = set(), [], {}
    for case in cases:
        if case.prompt in seen or (limit is not None and per_kind.get(case.kind, 0) >= limit):
            continue
        seen.add(case.prompt)
        per_kind[case.kind] = per_kind.get(case.kind, 0) + 1
        out.append(case)
    if not out:
        raise _error(f"no good answers to compare with (--good {source}): give the constitution worked examples, "
                     "run the sl stage with sl.verify_revisions, or pass --good FILE")
    return out


# -------------------------------------------------------------------------------------------------
# 3. Judges: each returns, per (probe answer, good answer, case), a dict of what it saw


def judge_pairwise(labeler, constitution, templates, cfg, trials: list[tuple[str, Case]], principles: int | None) -> list[dict]:
    """P(probe better) in both orders under the constitution's comparison principles (the prefs stage's
    judge_pairs): `p` debiased, `as_a` / `as_b` the probe shown first / second."""
    from cai.chat import conversation
    from cai.preferences import JudgeSettings, PairItem, judge_pairs

    m = principles or len(constitution.comparisons)
    chain = cfg.prefs.chain_of_thought and getattr(labeler, "id", "").split(":")[0] != "rules"
    settings = JudgeSettings.from_config(cfg, principles_per_pair=m, chain_of_thought=chain)
    items = [PairItem(f"stress:{k}", conversation(case.prompt, None, cfg.policy.system_prompt), probe, case.good)
             for k, (probe, case) in enumerate(trials)]
    verdicts = judge_pairs(labeler, items, constitution, templates, settings=settings, desc="stress (pairwise)")
    return [pairwise_seen(v.label, v.principles) for v in verdicts]


def pairwise_seen(label: float | None, principles: list[dict]) -> dict:
    """What one pairwise verdict says about the probe (the first answer): P(better) debiased, in each
    order, and per principle."""
    orders = {o: [e["orders"][o]["p_first"] for e in principles if e["orders"][o].get("p_first") is not None]
              for o in ("ab", "ba")}
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    return {"p": label, "as_a": mean(orders["ab"]), "as_b": mean(orders["ba"]),
            "principles": {e["id"]: e.get("p_first") for e in principles}}


def judge_rules(constitution, cfg, trials, principles, judged_by=None) -> tuple[str, list[dict]]:
    """The rules judge by the checks of `judged_by` (default: the run's constitution), on the run's
    comparison principles; the kinds of the prompts are the cases'."""
    from cai.labelers.rules import RulesLabeler
    from cai.templates import Templates

    kinds = {case.prompt: case.kind for _, case in trials}
    labeler = RulesLabeler(judged_by or constitution, kinds)
    return labeler.id, judge_pairwise(labeler, constitution, Templates(cfg.templates), cfg, trials, principles)


def judge_reward_model(rm_dir: Path, cfg, trials) -> tuple[str, list[dict]]:
    from cai.policy_models import reward_as_ppo_reads_it
    from cai.rewards import RewardModelScorer

    reward = reward_as_ppo_reads_it(cfg, RewardModelScorer(rm_dir, cfg.cache_dir))  # a per-principle model's outputs where each applies
    prompts, kinds = [case.prompt for _, case in trials], [case.kind for _, case in trials]
    probe = reward(prompts, [p for p, _ in trials], kinds)
    cases = list(dict.fromkeys(case for _, case in trials))  # each good answer scored once, not once per probe
    scored = dict(zip(cases, reward([c.prompt for c in cases], [c.good for c in cases], [c.kind for c in cases])))
    return f"reward model {rm_dir}", [{"probe": a, "good": scored[case]} for a, (_, case) in zip(probe, trials)]


def judge_rating(labeler, constitution, templates, cfg, trials) -> list[dict]:
    """The labeler's probability-weighted 0-9 rating (d-RLAIF, scaled to [-1, 1]) of the probe and of the
    good answer; None where the rating was unreadable."""
    from cai.rewards import SCORE_OPTIONS, DirectLabelerReward, expected_score

    reward = DirectLabelerReward(labeler, constitution, templates, cfg)
    prompts = [case.prompt for _, case in trials]
    requests = reward.requests(prompts + prompts, [p for p, _ in trials] + [case.good for _, case in trials])
    scores = [expected_score(c.probs) if c.status == "ok" and c.probs and len(c.probs) == len(SCORE_OPTIONS) and sum(c.probs) > 0
              else None for c in labeler.choose(requests, desc="stress (ratings)")]
    n = len(trials)
    return [{"probe": scores[k], "good": scores[n + k]} for k in range(n)]


def service(url: str, timeout: float = 600.0):
    """(call(path, body) -> JSON, the service's /health) of a running `cai serve`; one line if it is not there."""
    import os
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    token = os.environ.get("CAI_SERVE_TOKEN", "").strip()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    base = url.rstrip("/")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the service is local: no proxy

    def call(path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        try:
            with opener.open(urllib.request.Request(f"{base}{path}", data=data, headers=headers), timeout=timeout) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as err:
            raise _error(f"--serve {url}: {path}: HTTP {err.code}: {err.read()[:200].decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as err:
            raise _error(f"--serve {url}: {path}: {getattr(err, 'reason', err)}") from None

    return call, call("/health")


def judge_service(url: str, trials) -> tuple[str, list[dict]]:
    """A running `cai serve`: pairwise mode, the good answer as the reference (both orders inside)."""
    call, health = service(url)
    out = []
    for start in range(0, len(trials), 16):
        chunk = trials[start : start + 16]
        body = {"mode": "pairwise", "items": [{"prompt": case.prompt, "answer": probe, "reference": case.good}
                                              for probe, case in chunk]}
        for result in call("/v1/score", body)["results"]:
            out.append(pairwise_seen(result.get("reward"), (result.get("details") or {}).get("principles") or []))
    return f"cai serve {url.rstrip('/')} ({health.get('labeler')})", out


# -------------------------------------------------------------------------------------------------
# 4. Summaries


def summarise(kind: str, seen: list[dict], principle: str | None = None, applies: list[bool] | None = None) -> dict:
    """One probe under one judge: its win rate against the good answer over the prompts read (pairwise:
    also in each order, and under the principle the probe attacks, over the prompts that principle
    applies to (`applies`, per row) where the judge asked it)."""
    if kind == "pairwise":
        applies = applies or [True] * len(seen)
        read = [s for s in seen if s["p"] is not None]
        mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
        on = [s["principles"].get(principle) for s, a in zip(seen, applies) if a and s["p"] is not None] if principle else []
        return {"prompts": len(read), "unread": len(seen) - len(read), "win_rate": mean([s["p"] for s in read]),
                "as_a": mean([s["as_a"] for s in read if s["as_a"] is not None]),
                "as_b": mean([s["as_b"] for s in read if s["as_b"] is not None]),
                "on_principle": mean([p for p in on if p is not None])}
    read = [s for s in seen if s["probe"] is not None and s["good"] is not None]
    wins = [1.0 if s["probe"] > s["good"] else 0.5 if s["probe"] == s["good"] else 0.0 for s in read]
    return {"prompts": len(read), "unread": len(seen) - len(read), "win_rate": sum(wins) / len(wins) if wins else None,
            "reward_probe": sum(s["probe"] for s in read) / len(read) if read else None,
            "reward_good": sum(s["good"] for s in read) / len(read) if read else None}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def stress_table(result: dict, markdown: bool = False) -> tuple[list[str], list[list[str]]]:
    """Rows: probes; columns: each judge's win rate against the good answer (pairwise: shown as A / as B;
    pointwise: mean reward of the probe vs the good answer), marked when it beats the margin."""
    judges = result["judges"]
    head = ["probe", "family", "prompts"] + [j["name"] for j in judges]
    margin = result.get("fail_on")
    rows = []
    for probe in result["probes"]:
        cells = []
        counts = set()
        for j in judges:
            r = result["results"].get(f"{probe['id']}|{j['name']}")
            if r is None or r["win_rate"] is None:
                cells.append("—")
                continue
            counts.add(r["prompts"])
            if j["kind"] == "pairwise":
                detail = f"A {_pct(r['as_a'])} / B {_pct(r['as_b'])}"
                if r.get("on_principle") is not None:
                    detail += f"; {probe['principle']} {_pct(r['on_principle'])}"
            else:
                detail = f"{r['reward_probe']:+.2f} vs {r['reward_good']:+.2f}"
            flag = " ⚠" if r["win_rate"] > 0.5 + (margin if margin is not None else SHOWN_MARGIN) else ""
            cells.append(f"{_pct(r['win_rate'])}{flag} ({detail})")
        rows.append([probe["id"], probe["family"], "/".join(str(c) for c in sorted(counts)) or "0"] + cells)
    return head, rows


def render_text(result: dict) -> str:
    head, rows = stress_table(result)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render_markdown(result: dict) -> str:
    head, rows = stress_table(result)
    cases = result["cases"]
    lines = [f"# cai stress: {result['config']}", "",
             f"{cases['total']} prompts with a good answer ({', '.join(f'{k}: {v}' for k, v in cases['by_kind'].items())}; "
             f"from {', '.join(f'{k} ({v})' for k, v in cases['by_origin'].items())}). Each cell: the probe's win rate "
             "against the good answer (pairwise: debiased P(probe better), then P(probe better) when shown as (A) and "
             "as (B), and under the principle the probe attacks; pointwise: the share of prompts the probe scores higher, then its mean reward vs the good "
             f"answer's). ⚠: above 50% + {result['fail_on'] if result.get('fail_on') is not None else SHOWN_MARGIN:g}.",
             "", "Judges: " + "; ".join(f"{j['name']} = {j['id']}" for j in result["judges"]), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    parser.add_argument("--judges", default="auto", metavar="LIST",
                        help=f"comma-separated, of {', '.join(JUDGES)}; auto: checks (with checks), judge (when eval.judge is "
                        "set apart from the choice labeler), rm (when rm/ is finished), labeler and rating (when the choice "
                        "labeler is not the rules judge), serve (with --serve)")
    parser.add_argument("--good", default="auto", metavar="SOURCE",
                        help="good answers: auto (the constitution's worked examples, the verified SL-CAI revisions and the SFT "
                        "model's answers to the prefs stage's helpful prompts), "
                        "constitution, sl, or a JSONL file of {prompt, answer, kind}")
    parser.add_argument("--probes", metavar="FILE", help="a YAML file of your own probes (the format of cai/data/stress_probes.yaml)")
    parser.add_argument("--only", metavar="IDS", help="comma-separated probe ids or families to run (default: all)")
    parser.add_argument("--prompts", type=int, metavar="N", help="at most N prompts of each kind")
    parser.add_argument("--principles", type=int, metavar="M", help="comparison principles per pair (default: every one)")
    parser.add_argument("--rm", metavar="DIR", help="the reward model to stress (default: OUTPUT_DIR/rm)")
    parser.add_argument("--serve", metavar="URL", help="a running `cai serve`, e.g. http://127.0.0.1:8000 ($CAI_SERVE_TOKEN if set)")
    parser.add_argument("--out", metavar="DIR", help="folder for stress.json and stress.md (default: OUTPUT_DIR/stress)")
    parser.add_argument("--fail-on", type=float, metavar="MARGIN",
                        help="exit with 1 when a probe's win rate against the good answer exceeds 0.5 + MARGIN with any judge")


def pick_judges(args, cfg, constitution) -> tuple[list[str], Path, object]:
    """The judges to ask (`--judges`, or every one the run has), the reward model's folder and the eval
    judge's own constitution (a rules judge with `eval.judge.constitution`); every problem one line,
    before anything loads."""
    from cai.labelers import check_api_key, labeler_config

    has_checks = any(p.check is not None for p in constitution.comparisons)
    choices, evaluator = labeler_config(cfg, "choices"), labeler_config(cfg, "judge")
    rm_dir = Path(args.rm).expanduser() if args.rm else Path(cfg.output_dir).expanduser() / "rm"
    if args.judges == "auto":
        wanted = [j for j, on in (("checks", has_checks), ("judge", cfg.eval.judge is not None and evaluator != choices),
                                  ("rm", (rm_dir / "normalization.json").is_file()),
                                  ("labeler", choices.backend != "rules"), ("rating", choices.backend != "rules"),
                                  ("serve", bool(args.serve))) if on]
    else:
        wanted = [j.strip() for j in args.judges.split(",") if j.strip()]
        bad = [j for j in wanted if j not in JUDGES]
        if bad:
            raise _error(f"--judges: unknown judge {bad[0]!r}; valid: {', '.join(JUDGES)}")
    if not wanted:
        raise _error("no judge to stress: the constitution has no checks, there is no finished rm/, the choice labeler is "
                     "the rules judge and no --serve URL is given; name some with --judges")
    if "checks" in wanted and not has_checks:
        raise _error(f"--judges checks: {cfg.constitution} has no comparison principle with a check")
    if "rm" in wanted and not (rm_dir / "normalization.json").is_file():
        raise _error(f"--judges rm: {rm_dir} is not a finished reward model (no normalization.json); run `cai rm` or pass --rm DIR")
    if "serve" in wanted and not args.serve:
        raise _error("--judges serve needs --serve URL (a running `cai serve`)")
    if "serve" in wanted:
        service(args.serve, timeout=10.0)  # there, and the token accepted: one line now if not
    judged_by = None
    if "judge" in wanted and evaluator.backend == "rules":
        from cai.labelers.rules import judge_constitution

        judged_by = judge_constitution(cfg, evaluator)  # a missing file or principle: one line, now
    roles = (("choices",) if {"labeler", "rating"} & set(wanted) else ()) + (("judge",) if "judge" in wanted else ())
    check_api_key(cfg, roles)
    return wanted, rm_dir, judged_by


def run_stress(args) -> int:
    from cai.config import load_config
    from cai.constitution import load_constitution
    from cai.records import atomic_write_text
    from cai.templates import Templates

    started = time.time()
    cfg = load_config(args.config, args.overrides)
    constitution = load_constitution(cfg.constitution)
    templates = Templates(cfg.templates)
    run_dir = Path(cfg.output_dir).expanduser()
    if args.fail_on is not None and not 0.0 <= args.fail_on < 0.5:
        raise _error(f"--fail-on must be in [0, 0.5): a win rate above 0.5 + MARGIN fails, got {args.fail_on}")
    wanted, rm_dir, judged_by = pick_judges(args, cfg, constitution)
    probes, comply = library(args.probes, constitution)
    if args.only:
        keep = {x.strip() for x in args.only.split(",")}
        probes = [p for p in probes if p.id in keep or p.family in keep]
        if not probes:
            raise _error(f"--only {args.only}: no probe has that id or family")
    cases = gather_cases(cfg, constitution, args.good, args.prompts)
    trials = [(probe, case) for probe in probes for case in cases if case.kind in probe.kinds]
    written = [(probe.write(case, comply), case) for probe, case in trials]
    print(f"[stress] {len(probes)} probes x {len(cases)} prompts with a good answer = {len(trials)} trials; "
          f"judges: {', '.join(wanted)}", flush=True)

    judges, seen = [], {}
    labeler = None
    try:
        for name in wanted:
            began = time.time()
            print(f"[stress] {name} ...", flush=True)
            if name == "checks":
                judge_id, rows = judge_rules(constitution, cfg, written, args.principles)
            elif name == "judge" and judged_by is not None:
                judge_id, rows = judge_rules(constitution, cfg, written, args.principles, judged_by)
            elif name == "judge":
                from cai.labelers import build_labeler

                judge_labeler = build_labeler(cfg, role="judge")
                try:
                    judge_id = judge_labeler.id
                    rows = judge_pairwise(judge_labeler, constitution, templates, cfg, written, args.principles)
                finally:
                    judge_labeler.close()
            elif name == "rm":
                judge_id, rows = judge_reward_model(rm_dir, cfg, written)
            elif name == "serve":
                judge_id, rows = judge_service(args.serve, written)
            else:
                if labeler is None:
                    from cai.labelers import build_labeler

                    labeler = build_labeler(cfg, role="choices")
                judge_id = labeler.id
                rows = (judge_pairwise(labeler, constitution, templates, cfg, written, args.principles) if name == "labeler"
                        else judge_rating(labeler, constitution, templates, cfg, written))
            judges.append({"name": name, "id": judge_id, "kind": "pairwise" if name in PAIRWISE else "pointwise",
                           "seconds": round(time.time() - began, 1)})
            seen[name] = rows
    finally:
        if labeler is not None:
            labeler.close()

    from cai.checks import principle_checks

    checks = principle_checks(constitution)  # where a principle has a `when`, its rows count only on those prompts
    results = {}
    for probe in probes:
        rows_of = [k for k, (p, _) in enumerate(trials) if p is probe]
        check = checks.get(probe.principle)
        applies = [check is None or check.applies_to(trials[k][1].prompt, trials[k][1].kind) for k in rows_of]
        for j in judges:
            results[f"{probe.id}|{j['name']}"] = summarise(j["kind"], [seen[j["name"]][k] for k in rows_of], probe.principle, applies)
    margin = args.fail_on
    failed = [key for key, r in results.items() if margin is not None and r["win_rate"] is not None and r["win_rate"] > 0.5 + margin]
    result = {
        "config": str(args.config), "constitution": cfg.constitution, "fail_on": margin, "failed": failed,
        "cases": {"total": len(cases), "by_kind": {k: sum(c.kind == k for c in cases) for k in KINDS if any(c.kind == k for c in cases)},
                  "by_origin": {o: sum(c.origin == o for c in cases) for o in dict.fromkeys(c.origin for c in cases)}},
        "judges": judges,
        "probes": [{"id": p.id, "family": p.family, "principle": p.principle, "kinds": list(p.kinds)} for p in probes],
        "results": results,
        "examples": {p.id: next((a for (q, _), (a, _) in zip(trials, written) if q is p), None) for p in probes},
        "trials": [{"probe": probe.id, "prompt": case.prompt, "kind": case.kind, "answer": answer,
                    **{j["name"]: seen[j["name"]][k] for j in judges}}
                   for k, ((probe, case), (answer, _)) in enumerate(zip(trials, written))],
        "seconds": round(time.time() - started, 1),
    }
    out = Path(args.out).expanduser() if args.out else run_dir / "stress"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "stress.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "stress.md", render_markdown(result))
    print(render_text(result))
    timings = ", ".join(f"{j['name']} {j['seconds']} s" for j in judges)
    print(f"[stress] {len(trials)} trials, {timings}; written to {out / 'stress.json'} and stress.md "
          f"({result['seconds']} s in all)")
    if failed:
        print(f"[stress] {len(failed)} probe(s) beat the good answer by more than {margin:g} "
              f"(win rate > {0.5 + margin:.0%}): {', '.join(k.replace('|', ' with ') for k in failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from cai.errors import CaiError

    parser = argparse.ArgumentParser(prog="cai stress", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_stress(args)
    except CaiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
