"""cai's constitutional judge as `cai serve` and the engine adapters use it: items, results, the three
scoring modes (docs/serve.md).

- pointwise (d-RLAIF, Lee et al. 2023): the labeler's probability-weighted 0-9 rating of each answer under
  the constitution, scaled to [-1, 1] (cai/rewards.py); with `serve.per_principle` one rating per principle;
- pairwise: P(answer better than a reference answer), the prefs stage's debiased soft label
  (cai/preferences.py: M principles, both orders); the caller sends the reference, or the judge samples
  one from `serve.reference_model`;
- group: for GRPO-style groups of answers to one prompt, every pair of the group is judged as in pairwise,
  and an answer's reward is its win rate against the others (`group_win_rates`).

Besides the aggregate, each answer gets a reward per principle (`ScoreResult.principles`), for
multi-objective training. A prompt's kind (red_team | helpful), which the checks' `when: {kind}`
conditions read, comes from the caller or the run's prompt files; the details say when it is unknown and
which checks therefore did not apply. The labeler's faults never raise: they are errors on the items
concerned, and an error the labeler raises on a batch is narrowed down to the items that raise it alone.
"""

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from cai.errors import CaiError
from cai.labelers.base import BudgetExceeded, GenerateRequest, Message

log = logging.getLogger("cai.serve")

MODES = ("pointwise", "pairwise", "group")
NEUTRAL_REWARD = {"pointwise": 0.0, "pairwise": 0.5, "group": 0.5}  # the middle of each mode's scale
KINDS = ("red_team", "helpful", "custom")


# -------------------------------------------------------------------------------------------------
# Items and results


@dataclass(frozen=True)
class ScoreItem:
    """One answer to score. `prompt` is the user's text or a conversation ending with the user's turn;
    `reference` is the answer a pairwise score compares against; `group` names the GRPO group (by
    default, answers to the same prompt form a group); `kind` is the prompt's kind when the caller knows
    it. `error` says why an item cannot be judged at all (a query whose prompt was not found in it): it
    fails as it is; `notes` go into its details (how its text was read)."""

    prompt: str | tuple | list
    answer: str
    reference: str | None = None
    group: Any = None
    kind: str | None = None
    error: str | None = None
    notes: dict = field(default_factory=dict, compare=False)


@dataclass
class ScoreResult:
    """`reward` is None when the item could not be scored; `status` and `error` say why. `principles`:
    the reward under each principle judged (same scale as `reward`; None where it got no verdict)."""

    reward: float | None
    status: str = "ok"  # ok | failed | unparseable | timeout | short
    error: str | None = None
    details: dict = field(default_factory=dict)
    principles: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"reward": self.reward, "status": self.status, "error": self.error, "principles": self.principles,
                "details": self.details}


def conversation_of(prompt) -> list[Message]:
    """The prompt as chat messages (a plain string is one user turn)."""
    from cai.chat import conversation

    if isinstance(prompt, str):
        return conversation(prompt)
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def group_key(item: ScoreItem):
    return item.group if item.group is not None else json.dumps(conversation_of(item.prompt), sort_keys=True)


def content_id(*parts) -> str:
    """An id made from the content, so that the principles drawn for it (seeded by id) and therefore the
    labeler's questions, and their cache keys, are the same in every request and after a restart."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


def group_win_rates(size: int, p_first: dict[tuple[int, int], float | None]) -> list[float | None]:
    """Each answer's debiased win rate within its group.

    `p_first[(i, j)]` (i < j) is P(answer i is better than answer j), already averaged over both
    presentation orders and the principles (preferences.judge_pairs), or None when the labeler gave no
    readable verdict. Answer i's win rate is the mean over the others j of P(i beats j), where
    P(j beats i) = 1 - P(i beats j); pairs without a verdict are left out; None when none is left.
    The rates of a group with every verdict known average to exactly 0.5.
    """
    wins: list[list[float]] = [[] for _ in range(size)]
    for (i, j), p in p_first.items():
        if p is None:
            continue
        wins[i].append(p)
        wins[j].append(1.0 - p)
    return [sum(w) / len(w) if w else None for w in wins]


def _known_kinds(cfg) -> dict[str, str]:
    """Every prompt of the run's files (data.red_team, data.helpful, eval.prompts; all of them, not only the
    ones data.limit keeps) -> its kind: the fallback when a caller sends none. A text in both sets is red-team."""
    from cai.promptsets import load_prompt_file, load_prompt_texts, prompt_files

    kinds: dict[str, str] = {}
    try:
        for kind in ("red_team", "helpful"):
            for text in load_prompt_texts(getattr(cfg.data, kind), kind, cfg.data.column, cfg.data.split):
                kinds.setdefault(text, kind)
        for path, kind in prompt_files(cfg.eval.prompts):
            for prompt in load_prompt_file(path, kind):
                kinds.setdefault(prompt.text, prompt.kind)
    except CaiError as err:  # a data source that does not load here (a hub dataset offline): no fallback from it
        log.warning("prompt kinds from the run's files are not available: %s", err)
    return kinds


# -------------------------------------------------------------------------------------------------
# The judge (in process)


class Judge:
    """The constitution and labeler of a run, scoring answers in one of the three modes.

    `labeler` replaces the configured one (tests pass a scripted labeler); `reference_sampler` is a
    labeler whose `generate` writes references in pairwise mode with `serve.reference=sample`.
    """

    def __init__(self, cfg, labeler=None, reference_sampler=None):
        from cai.checks import distinct_checks
        from cai.constitution import load_constitution
        from cai.preferences import JudgeSettings
        from cai.rewards import DirectLabelerReward
        from cai.templates import Templates

        self.cfg = cfg
        self.mode = cfg.serve.mode
        self.constitution = load_constitution(cfg.constitution)
        self.templates = Templates(cfg.templates)
        if not self.constitution.comparisons:
            raise CaiError(f"{cfg.constitution}: constitution '{self.constitution.name}' has no comparison "
                           "principles; the judge needs at least one")
        self.principle_ids = [p.id for p in self.constitution.comparisons]
        self.per_principle = cfg.serve.per_principle
        m = len(self.principle_ids) if self.per_principle else (cfg.serve.principles_per_pair or cfg.prefs.principles_per_pair)
        self.settings = JudgeSettings.from_config(cfg, principles_per_pair=m)
        if labeler is None:
            from cai.labelers import build_labeler

            labeler = build_labeler(cfg, role="choices")
        self.labeler = labeler
        self.direct = DirectLabelerReward(labeler, self.constitution, self.templates, cfg)
        self._reference_sampler = reference_sampler
        self.kinds = _known_kinds(cfg)
        self.checks = distinct_checks(self.constitution)

    @property
    def usage(self) -> dict:
        return self.labeler.usage.as_dict()

    @property
    def failed_reward(self) -> float:
        """What an adapter reports for an item (or a principle) without a score: serve.failed_reward, or
        the mode's neutral value."""
        value = self.cfg.serve.failed_reward
        return NEUTRAL_REWARD[self.mode] if value is None else value

    def reports_principles(self, mode: str | None = None) -> list[str]:
        """The principle ids each result carries a reward for in `mode` (pointwise: only with per_principle)."""
        mode = mode or self.mode
        return list(self.principle_ids) if mode != "pointwise" or self.per_principle else []

    def close(self) -> None:
        self.labeler.close()
        if self._reference_sampler is not None:
            self._reference_sampler.close()

    def score(self, items: list[ScoreItem], mode: str | None = None) -> list[ScoreResult]:
        """Scores in input order. Never raises for the labeler's faults: a failed or unreadable item, a
        budget reached or a refused key is an error on each item concerned, and an error the labeler
        raises on a batch is narrowed down to the items (or groups) that raise it alone."""
        mode = mode or self.mode
        if mode not in MODES:
            raise CaiError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        results: list[ScoreResult | None] = [None] * len(items)
        kinds = [self._kind(item) for item in items]
        ready = []
        for k, item in enumerate(items):
            if item.error is not None:
                results[k] = ScoreResult(None, "failed", item.error)
            else:
                ready.append(k)
        if ready:
            todo = [replace(items[k], kind=kinds[k][0]) for k in ready]
            run = {"pointwise": self._pointwise, "pairwise": self._pairwise, "group": self._group}[mode]
            if mode == "group":
                groups: dict[Any, list[int]] = {}
                for n, item in enumerate(todo):
                    groups.setdefault(group_key(item), []).append(n)
                units = list(groups.values())
            else:
                units = [[n] for n in range(len(todo))]
            try:
                scored = self._isolated(run, todo, units)
            except (BudgetExceeded, CaiError) as err:
                why = f"{'budget reached' if isinstance(err, BudgetExceeded) else 'labeler error'}: {err}"
                log.error(why)
                scored = {n: ScoreResult(None, "failed", why) for n in range(len(todo))}
            for n, k in enumerate(ready):
                results[k] = scored[n]
        for k, (item, result) in enumerate(zip(items, results)):
            kind, source = kinds[k]
            result.details = {**item.notes, **self._kind_details(item, kind, source), **result.details}
            if "comparisons" in result.details:  # `against`: the other answer's index in this list
                for comparison in result.details["comparisons"]:
                    comparison["against"] = ready[comparison["against"]]
        return results  # type: ignore[return-value]

    def _isolated(self, run, items: list[ScoreItem], units: list[list[int]]) -> dict[int, ScoreResult]:
        """`run` over the items of `units` (lists of indices: a group, or one item); when it raises, each
        half again, so that only a unit that raises on its own fails."""
        chosen = [n for unit in units for n in unit]
        try:
            results = run([items[n] for n in chosen])
        except (BudgetExceeded, CaiError):
            raise
        except Exception as err:  # noqa: BLE001 - the labeler choked on something in this batch
            if len(units) == 1:
                log.exception("scoring failed")
                return {n: ScoreResult(None, "failed", f"{type(err).__name__}: {err}"[:500]) for n in chosen}
            half = len(units) // 2
            return {**self._isolated(run, items, units[:half]), **self._isolated(run, items, units[half:])}
        for result in results:
            for comparison in result.details.get("comparisons", ()):
                comparison["against"] = chosen[comparison["against"]]
        return dict(zip(chosen, results))

    # -- the prompt's kind ----------------------------------------------------------------------

    def _kind(self, item: ScoreItem) -> tuple[str | None, str | None]:
        """(kind, where it came from): the caller's, else the run's prompt files', else (None, None)."""
        if item.kind is not None:
            return item.kind, "caller"
        from cai.preferences import user_text

        kind = self.kinds.get(user_text(conversation_of(item.prompt)).strip())
        return (kind, "the run's prompt files") if kind is not None else (None, None)

    def _kind_details(self, item: ScoreItem, kind: str | None, source: str | None) -> dict:
        if kind is not None:
            return {"kind": kind, "kind_from": source}
        from cai.preferences import user_text

        text = user_text(conversation_of(item.prompt))
        missed = [pid for pid, check in self.checks.items()
                  if not check.applies_to(text, None) and any(check.applies_to(text, k) for k in KINDS)]
        out: dict = {"kind": None}
        if missed:
            out["checks_not_applied"] = missed
            out["kind_note"] = ("no kind was sent with this prompt and the run's prompt files do not hold it, so the "
                                f"checks that apply to a kind of prompt did not apply ({', '.join(missed)}); send "
                                "`kind` (cai's protocol, a TRL dataset column, verl's extra_info, OpenRLHF's labels)")
        return out

    # -- pointwise: d-RLAIF --------------------------------------------------------------------

    def _rating_requests(self, items: list[ScoreItem], principle=None) -> list:
        """score.jinja for each item (under every principle, or under `principle` alone), its kind attached."""
        from cai.preferences import user_text

        direct = self.direct
        if principle is not None:
            direct = copy.copy(self.direct)
            direct.principles = [principle.question]
        requests = direct.requests([user_text(conversation_of(it.prompt)) for it in items], [it.answer for it in items])
        extra = [{"kind": it.kind} if it.kind else {} for it in items]
        if principle is not None:
            extra = [{**e, "principle": principle.id} for e in extra]
        return [replace(r, subject={**r.subject, **e}) for r, e in zip(requests, extra)]

    @staticmethod
    def _rating(choice) -> tuple[float | None, dict, str | None]:
        """(reward in [-1, 1], details, error) from one 0-9 rating choice."""
        from cai.rewards import SCORE_OPTIONS, expected_score

        probs = choice.probs
        if choice.status != "ok" or not probs or len(probs) != len(SCORE_OPTIONS) or sum(probs) <= 0:
            error = choice.error or f"no usable rating probabilities ({choice.status})"
            return None, {"raw": choice.raw, "status": "failed" if choice.status == "failed" else "unparseable"}, error
        total = sum(probs)
        rating = sum(n * p for n, p in enumerate(probs)) / total
        return expected_score(probs), {"expected_rating": rating, "rating_probs": [p / total for p in probs],
                                       "method": choice.method}, None

    def _pointwise(self, items: list[ScoreItem]) -> list[ScoreResult]:
        if not self.per_principle:
            results = []
            for choice in self.labeler.choose(self._rating_requests(items), desc=None):
                reward, details, error = self._rating(choice)
                results.append(ScoreResult(reward, details=details) if reward is not None else
                               ScoreResult(None, details.pop("status"), error, details))
            return results
        # one rating per principle; the aggregate is their mean
        principles = self.constitution.comparisons
        requests = [r for p in principles for r in self._rating_requests(items, p)]
        choices = self.labeler.choose(requests, desc=None)
        results = []
        for n in range(len(items)):
            per, ratings, errors = {}, {}, []
            for k, p in enumerate(principles):
                reward, details, error = self._rating(choices[k * len(items) + n])
                per[p.id], ratings[p.id] = reward, details
                if error:
                    errors.append(f"{p.id}: {error}")
            known = [v for v in per.values() if v is not None]
            details = {"ratings": ratings}
            if known:
                results.append(ScoreResult(sum(known) / len(known), details=details, principles=per))
            else:
                results.append(ScoreResult(None, "failed", "; ".join(errors)[:500], details, per))
        return results

    # -- pairwise: against a reference ---------------------------------------------------------

    def _references(self, items: list[ScoreItem]) -> list[str | None]:
        refs = [it.reference for it in items]
        if self.cfg.serve.reference != "sample":
            return refs
        missing = [k for k, r in enumerate(refs) if r is None]
        if missing:
            sampler = self._sampler()
            policy = self.cfg.policy
            asks = [GenerateRequest(conversation_of(items[k].prompt), max_new_tokens=policy.max_new_tokens,
                                    temperature=policy.temperature, top_p=policy.top_p) for k in missing]
            for k, generation in zip(missing, sampler.generate(asks, desc=None)):
                refs[k] = generation.text if generation.status == "ok" else None
        return refs

    def reference_model(self) -> str:
        """Who writes sampled references: serve.reference_model, else the SL-CAI model when the sft stage
        is finished under this config, else policy.model."""
        from cai.stage_state import is_current, stage_dir

        if self.cfg.serve.reference_model is not None:
            return self.cfg.serve.reference_model
        return str(stage_dir(self.cfg, "sft")) if is_current(self.cfg, "sft") else self.cfg.policy.model

    def _sampler(self):
        if self._reference_sampler is None:
            from cai.labelers import build_labeler

            sampler_cfg = self.cfg.model_copy(deep=True)
            sampler_cfg.labeler.backend = "local"
            sampler_cfg.labeler.model = self.reference_model()
            sampler_cfg.labeler.system_prompt = self.cfg.policy.system_prompt
            self._reference_sampler = build_labeler(sampler_cfg)
        return self._reference_sampler

    @staticmethod
    def _by_principle(verdict) -> dict[str, float | None]:
        return {e["id"]: e.get("p_first") for e in verdict.principles}

    def _pairwise(self, items: list[ScoreItem]) -> list[ScoreResult]:
        from cai.preferences import PairItem, judge_pairs

        refs = self._references(items)
        asked = [k for k, ref in enumerate(refs) if ref is not None and ref.strip()]
        pairs = [PairItem(content_id("pair", conversation_of(items[k].prompt), items[k].answer, refs[k]),
                          conversation_of(items[k].prompt), items[k].answer, refs[k], items[k].kind) for k in asked]
        results = [ScoreResult(None, "failed", "pairwise mode needs a reference answer (serve.reference=caller: "
                               "send one with each item)") for _ in items]
        for k, verdict in zip(asked, judge_pairs(self.labeler, pairs, self.constitution, self.templates,
                                                 settings=self.settings)):
            details = {"reference": refs[k], "principles": verdict.principles}
            per = self._by_principle(verdict)
            if verdict.label is None:
                results[k] = ScoreResult(None, verdict.status, "no principle got a readable verdict in both orders",
                                         details, per)
            else:
                results[k] = ScoreResult(verdict.label, details=details, principles=per)
        return results

    # -- group: debiased win rates -------------------------------------------------------------

    def _group(self, items: list[ScoreItem]) -> list[ScoreResult]:
        from cai.preferences import PairItem, judge_pairs

        groups: dict[Any, list[int]] = {}
        for k, item in enumerate(items):
            groups.setdefault(group_key(item), []).append(k)
        # the pairs of a group in an order set by the answers, not by their arrival: the same principles
        # are drawn whether a group came in one request or in one request per answer
        groups = {key: sorted(members, key=lambda k: items[k].answer) for key, members in groups.items()}
        pairs, where = [], []  # where[n] = (group members, i, j) of pairs[n]
        for members in groups.values():
            for i in range(len(members)):
                for j in range(i + 1, len(members)):
                    a, b = items[members[i]], items[members[j]]
                    conv = conversation_of(a.prompt)
                    pairs.append(PairItem(content_id("pair", conv, a.answer, b.answer), conv, a.answer, b.answer, a.kind))
                    where.append((members, i, j))
        verdicts = judge_pairs(self.labeler, pairs, self.constitution, self.templates, settings=self.settings)
        p_first: dict[int, dict[tuple[int, int], float | None]] = {}
        per_principle: dict[int, dict[str, dict[tuple[int, int], float | None]]] = {}
        comparisons: dict[int, list[dict]] = {k: [] for k in range(len(items))}
        for (members, i, j), verdict in zip(where, verdicts):
            p_first.setdefault(id(members), {})[(i, j)] = verdict.label
            for pid, p in self._by_principle(verdict).items():
                per_principle.setdefault(id(members), {}).setdefault(pid, {})[(i, j)] = p
            for me, other, p in ((i, j, verdict.label), (j, i, None if verdict.label is None else 1 - verdict.label)):
                comparisons[members[me]].append({"against": members[other], "answer": items[members[other]].answer,
                                                 "first": me == i, "p_better": p, "status": verdict.status,
                                                 "principles": verdict.principles})  # p_first: of the pair's first
        results: list[ScoreResult] = [None] * len(items)  # type: ignore[list-item]
        for members in groups.values():
            if len(members) < 2:
                results[members[0]] = ScoreResult(None, "failed", "group mode needs at least two answers per group "
                                                  "(answers to the same prompt, or the same `group`); an engine that "
                                                  "sends one answer per request needs serve.group_size (its samples "
                                                  "per prompt) so that the service gathers them")
                continue
            rates = group_win_rates(len(members), p_first.get(id(members), {}))
            by_principle = {pid: group_win_rates(len(members), p)
                            for pid, p in per_principle.get(id(members), {}).items()}
            for n, (member, rate) in enumerate(zip(members, rates)):
                details = {"group_size": len(members), "comparisons": comparisons[member]}
                per = {pid: r[n] for pid, r in by_principle.items()}
                if rate is None:
                    results[member] = ScoreResult(None, "failed", "no comparison of this answer got a readable verdict",
                                                  details, per)
                else:
                    results[member] = ScoreResult(rate, details={"win_rate": rate, **details}, principles=per)
        return results
