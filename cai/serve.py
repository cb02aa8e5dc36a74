"""`cai serve CONFIG`: the run's constitutional judge as an HTTP reward service (docs/serve.md).

RL engines that train past one machine (OpenRLHF, verl, TRL's GRPO with vLLM) take "a remote reward
URL or a Python function". This module gives them cai's judge: the run's constitution and labeler,
through the same machinery the stages use (principles drawn per item and seeded, both orders, soft
labels, chain of thought by config, the answer cache, budgets, usage accounting).

1. Scoring modes (`serve.mode`, or per request in cai's protocol):
   - pointwise (d-RLAIF, Lee et al. 2023): the labeler's probability-weighted 0-9 rating of each answer
     under the constitution, scaled to [-1, 1] (cai/rewards.py);
   - pairwise: P(answer better than a reference answer), the prefs stage's debiased soft label
     (cai/preferences.py: M principles, both orders); the caller sends the reference, or the service
     samples one from `serve.reference_model`;
   - group: for GRPO-style groups of answers to one prompt, every pair of the group is judged as in
     pairwise, and an answer's reward is its win rate against the others (`group_win_rates`).
   Besides the aggregate, each answer gets a reward per principle (`ScoreResult.principles`), for
   multi-objective training (verl's GDPO, TRL's per-function normalisation); `serve.per_principle` asks
   every principle for every answer so that none is missing. A prompt's kind (red_team | helpful), which
   the checks' `when: {kind}` conditions read, comes from the caller or the run's prompt files, and the
   details say when it is unknown and which checks therefore did not apply.
2. Batching: HTTP handlers put their items on one queue; a single worker thread takes everything
   queued (up to `serve.max_batch` items) and hands it to the labeler as one batch, so an API labeler
   keeps `labeler.concurrency` requests in flight across concurrent callers, and the labeler is only
   ever used from one thread. In group mode with `serve.group_size`, the answers to one prompt are first
   gathered across requests (OpenRLHF 0.11 and verl 0.9 send one answer per request) until the group is
   whole or `serve.group_wait` has passed (then it is scored as it is, with status `short`). A batch
   that raises is split until the item at fault fails alone.
3. Protocols: OpenRLHF's `POST /get_reward` (its chat markup read back out of the text,
   cai/chat_markup.py), cai's `POST /v1/score` (per-principle details), and `GET /health`,
   `GET /metrics` (Prometheus text). Adapters for TRL and verl: cai/integrations.py.
4. Serving: 127.0.0.1 unless `serve.host` says otherwise; a caller needs the bearer token from
   `$serve.token_env` or an address in `serve.trusted_networks` whenever either is set, and binding any
   other address without one of them is refused; the path is read from the ASGI scope (never from the
   Host header); request and item caps; a request that waits longer than `serve.request_timeout` is
   answered with a timeout error per item (the labeling goes on into the cache, so a retry is answered
   from it).

Kills: the answer cache stores each labeler answer the moment it arrives, so a service killed mid-batch
and restarted asks the labeler for nothing it had already received.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import concurrent.futures
import contextlib
import copy
import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from ipaddress import ip_address, ip_network
from pathlib import Path
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
# 1. The judge (in process)


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


# -------------------------------------------------------------------------------------------------
# 2. One worker thread: everything queued becomes one labeler batch


_STOP = object()  # put on the queue to end the worker
SHUTTING_DOWN = "the service is shutting down; send the request again"


@dataclass
class _Job:
    items: list[ScoreItem]
    mode: str
    future: concurrent.futures.Future


class Batcher:
    """Merges the items of concurrent requests into labeler batches of at most `max_batch` items. After
    the first request of a batch, it waits up to `wait` seconds for others: callers that were answered
    together send their next requests together, and a batch that started without them would leave the
    labeler's concurrency idle until it ends."""

    def __init__(self, judge: Judge, max_batch: int, wait: float = 0.0):
        self.judge = judge
        self.max_batch = max_batch
        self.wait = wait
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="cai-serve-judge", daemon=True)
        self._thread.start()
        self._jobs = 0

    def submit(self, items: list[ScoreItem], mode: str) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(items, mode, future))
        return future

    def close(self) -> None:
        """Finish the batch in hand (the labeler is closed only after it), answer what is still queued."""
        self._queue.put(_STOP)
        self._thread.join()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and not job.future.done():
                job.future.set_result([ScoreResult(None, "failed", SHUTTING_DOWN) for _ in job.items])

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _work(self) -> None:
        carried = None
        while True:
            job = carried if carried is not None else self._queue.get()
            carried = None
            if job is _STOP:
                return
            jobs, size = [job], len(job.items)
            deadline = time.monotonic() + self.wait
            while size < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is _STOP or size + len(nxt.items) > self.max_batch:
                    carried = nxt
                    break
                jobs.append(nxt)
                size += len(nxt.items)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        for mode in dict.fromkeys(j.mode for j in jobs):
            these = [j for j in jobs if j.mode == mode]
            merged: list[ScoreItem] = []
            for job in these:
                self._jobs += 1
                # a group is what one job holds: groups never reach across the jobs of a batch
                merged += [replace(it, group=(self._jobs, group_key(it))) if mode == "group" else it for it in job.items]
            try:
                results = self.judge.score(merged, mode)
            except Exception as err:  # noqa: BLE001 - a bug must not leave callers waiting
                log.exception("scoring failed")
                results = [ScoreResult(None, "failed", f"{type(err).__name__}: {err}") for _ in merged]
            start = 0
            for job in these:
                mine = results[start : start + len(job.items)]
                for result in mine:  # `against` counts within the caller's own items
                    for comparison in result.details.get("comparisons", ()):
                        comparison["against"] -= start
                job.future.set_result(mine)
                start += len(job.items)


class GroupGatherer:
    """Group mode with `serve.group_size`: the answers to one prompt (or with one `group`) are gathered
    across requests, in the event loop, until `size` have arrived, and scored together as one job; a
    group still short `wait` seconds after its first answer is scored as it is, with status `short`."""

    def __init__(self, batcher: Batcher, size: int, wait: float):
        self.batcher, self.size, self.wait = batcher, size, wait
        self._open: dict[Any, dict] = {}
        self._requests = 0

    def add(self, items: list[ScoreItem]) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        self._requests += 1
        futures = []
        for index, item in enumerate(items):
            key = group_key(item)
            gathering = self._open.get(key)
            if gathering is None:
                gathering = self._open[key] = {"members": [], "timer": loop.call_later(self.wait, self._close, key)}
            future = loop.create_future()
            gathering["members"].append((item, future, self._requests, index))
            futures.append(future)
            if len(gathering["members"]) >= self.size:
                self._close(key)
        return futures

    def close(self) -> None:
        for key in list(self._open):
            self._close(key)

    def _close(self, key) -> None:
        gathering = self._open.pop(key, None)
        if gathering is None:
            return
        gathering["timer"].cancel()
        members = gathering["members"]
        loop = asyncio.get_running_loop()
        job = self.batcher.submit([m[0] for m in members], "group")
        job.add_done_callback(lambda done: loop.call_soon_threadsafe(self._answer, members, done))

    def _answer(self, members: list, done: concurrent.futures.Future) -> None:
        results = done.result()
        short = len(members) < self.size
        for (item, future, request, _), result in zip(members, results):
            for comparison in result.details.get("comparisons", ()):  # the other answer's index in *this* request
                _, _, other_request, other_index = members[comparison["against"]]
                comparison["against"] = other_index if other_request == request else None
            if short:
                closed = (f"the group closed after serve.group_wait={self.wait:g} s with {len(members)} of "
                          f"serve.group_size={self.size} answers to this prompt")
                if result.reward is not None:
                    result.status, result.error = "short", f"{closed}; the reward is the win rate among those {len(members)}"
                elif len(members) == 1:
                    result.status, result.error = "short", f"{closed}; nothing to compare it with"
                else:
                    result.error = f"{closed}; {result.error}"
            result.details["gathered"] = {"answers": len(members), "group_size": self.size}
            if not future.done():
                future.set_result(result)


# -------------------------------------------------------------------------------------------------
# 3. The HTTP service


LOOPBACK = {"localhost"}
ROUTES = ("/get_reward", "/v1/score", "/health", "/metrics")  # what /metrics counts by path; the rest is "other"


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    """Who may call: a caller from a trusted network, or one that sends the bearer token; anyone when
    neither is configured (then the service listens on loopback only)."""

    token: str | None
    networks: tuple = ()

    def allows(self, host: str | None, authorization: str) -> bool:
        if self.token is None and not self.networks:
            return True
        if host is not None and self.networks:
            try:
                address = ip_address(host)
            except ValueError:
                address = None
            if address is not None and any(address in network for network in self.networks):
                return True
        return self.token is not None and hmac.compare_digest(authorization.encode(), f"Bearer {self.token}".encode())


def access_rules(cfg) -> Access:
    """The token from `$serve.token_env` and `serve.trusted_networks`; an error when the service would be
    reachable from other machines with neither."""
    token = os.environ.get(cfg.serve.token_env, "").strip() or None
    networks = tuple(ip_network(n, strict=False) for n in cfg.serve.trusted_networks)
    if token is None and not networks and not is_loopback(cfg.serve.host):
        raise CaiError(f"serve.host={cfg.serve.host} is reachable from other machines: put a bearer token in "
                       f"${cfg.serve.token_env} (serve.token_env), list the callers' networks in "
                       "serve.trusted_networks, or bind 127.0.0.1")
    return Access(token, networks)


def service_token(cfg) -> str | None:
    """The bearer token (see access_rules, which refuses an open non-loopback bind)."""
    return access_rules(cfg).token


class Metrics:
    """Counters for /metrics (Prometheus text format). Requests are counted by route: a path that is not
    one of ours counts as "other", so no caller can add series or text to the exposition."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.items: dict[str, int] = {}
        self.latency_sum = 0.0
        self.latency_count = 0
        self.started = time.time()

    def count_request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
        self.latency_sum += seconds
        self.latency_count += 1

    def count_items(self, results: list[ScoreResult]) -> None:
        for r in results:
            self.items[r.status] = self.items.get(r.status, 0) + 1

    def render(self, usage: dict, pending: int) -> str:
        lines = ["# TYPE cai_serve_requests_total counter"]
        lines += [f'cai_serve_requests_total{{path="{p}",code="{c}"}} {n}' for (p, c), n in sorted(self.requests.items())]
        lines.append("# TYPE cai_serve_items_total counter")
        lines += [f'cai_serve_items_total{{status="{s}"}} {n}' for s, n in sorted(self.items.items())]
        lines += ["# TYPE cai_serve_request_seconds summary",
                  f"cai_serve_request_seconds_sum {self.latency_sum:.6f}",
                  f"cai_serve_request_seconds_count {self.latency_count}",
                  "# TYPE cai_serve_queued_requests gauge", f"cai_serve_queued_requests {pending}",
                  f"cai_serve_uptime_seconds {time.time() - self.started:.1f}"]
        names = {"requests": "requests_total", "cache_hits": "cache_hits_total", "cost": "cost_usd_total",
                 "input_tokens": "input_tokens_total", "output_tokens": "output_tokens_total",
                 "failed": "failed_total", "unparseable": "unparseable_total", "retries": "retries_total"}
        for key, name in names.items():
            if isinstance(usage.get(key), (int, float)):
                lines.append(f"cai_labeler_{name} {usage[key]}")
        return "\n".join(lines) + "\n"


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _kind_of(value, where: str) -> str | None:
    if value is None:
        return None
    if value not in KINDS:
        raise RequestError(400, f"{where} must be one of {', '.join(KINDS)}, got {value!r}")
    return value


def _items_from_cai(body: Any, max_items: int, modes: tuple[str, ...] = MODES) -> tuple[list[ScoreItem], str | None]:
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise RequestError(400, 'the body must be {"items": [{"prompt": ..., "answer": ...}, ...]}')
    mode = body.get("mode")
    if mode is not None and mode not in modes:
        raise RequestError(400, f"mode must be one of {', '.join(modes)}, got {mode!r}")
    raw = body["items"]
    if len(raw) > max_items:
        raise RequestError(413, f"{len(raw)} items in one request; serve.max_items is {max_items}")
    items = []
    for n, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise RequestError(400, f"items[{n}] must be an object")
        prompt, answer = entry.get("prompt"), entry.get("answer")
        if not isinstance(answer, str):
            raise RequestError(400, f"items[{n}].answer must be a string")
        if isinstance(prompt, list):
            if not prompt or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                     and isinstance(m.get("content"), str) for m in prompt):
                raise RequestError(400, f"items[{n}].prompt must be a string or a list of "
                                        '{"role": ..., "content": ...} messages')
            prompt = tuple({"role": m["role"], "content": m["content"]} for m in prompt)
        elif not isinstance(prompt, str):
            raise RequestError(400, f"items[{n}].prompt must be a string or a list of messages")
        reference = entry.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise RequestError(400, f"items[{n}].reference must be a string")
        group = entry.get("group")
        if group is not None and not isinstance(group, (str, int)):
            raise RequestError(400, f"items[{n}].group must be a string or an integer")
        items.append(ScoreItem(prompt, answer, reference, group, _kind_of(entry.get("kind"), f"items[{n}].kind")))
    return items, mode


def _label_fields(label, n: int) -> tuple[str | None, str | None]:
    """(reference, kind) from one of OpenRLHF's `labels` (your dataset's --label_key column): an object
    (or its JSON text) with `reference` and/or `kind`, a kind's name, or the reference answer's text."""
    if isinstance(label, str) and label.lstrip().startswith("{"):
        try:
            label = json.loads(label)
        except ValueError:
            pass
    if isinstance(label, dict):
        reference = label.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise RequestError(400, f"labels[{n}].reference must be a string")
        return reference or None, _kind_of(label.get("kind"), f"labels[{n}].kind")
    if isinstance(label, str) and label in KINDS:
        return None, label
    return (label if isinstance(label, str) and label else None), None


def _items_from_openrlhf(body: Any, max_items: int, markup=None) -> list[ScoreItem]:
    """OpenRLHF sends `query` (prompt + answer as its tokenizer decoded them, special tokens kept),
    `prompts` (the prompt as its chat template wrote it; older clients send none) and `labels`.
    The prompt's markup is read back into a conversation and the answer's end-of-turn and special
    tokens are removed (cai/chat_markup.py); an item whose answer cannot be found fails with the reason."""
    from cai.chat_markup import clean_answer, split_query, untemplate

    if not isinstance(body, dict) or not isinstance(body.get("query"), list):
        raise RequestError(400, 'the body must be {"query": [...], "prompts": [...], "labels": [...]}')
    queries = body["query"]
    prompts = body.get("prompts") or [None] * len(queries)
    labels = body.get("labels") or [None] * len(queries)
    if len(queries) > max_items:
        raise RequestError(413, f"{len(queries)} items in one request; serve.max_items is {max_items}")
    if len(prompts) != len(queries) or len(labels) != len(queries):
        raise RequestError(400, f"query, prompts and labels must have one entry each per item "
                                f"(got {len(queries)}, {len(prompts)}, {len(labels)})")
    items = []
    for n, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
        if not isinstance(query, str) or not (prompt is None or isinstance(prompt, str)):
            raise RequestError(400, f"query[{n}] and prompts[{n}] must be strings")
        reference, kind = _label_fields(label, n)
        if prompt is not None:
            read = untemplate(prompt, markup)
            answer, how = split_query(query, prompt)
        else:  # an older client: the answer is the query's last turn, the one it leaves open or its last assistant turn
            read = untemplate(query, markup)
            answer, how = None, "no `prompts` were sent and the query has no chat markup to find the answer in"
            if read.markup and read.open_turn is not None:
                answer, how = read.open_turn, "the open turn of the query's markup"
            elif read.markup and len(read.messages) > 1 and read.messages[-1]["role"] == "assistant":
                answer, how = read.messages[-1]["content"], "the last turn of the query's markup"
                read.messages = read.messages[:-1]
        used = read.markup or markup
        notes = {"markup": used.name if used else None, "answer_from": how if answer is not None else None}
        if answer is None:
            items.append(ScoreItem(tuple(read.messages), "", reference, kind=kind, error=how, notes=notes))
        else:
            items.append(ScoreItem(tuple(read.messages), clean_answer(answer, used), reference, kind=kind, notes=notes))
    return items


def policy_markup(cfg):
    """The chat markup of `serve.policy_model`'s tokenizer, or None (the families' markup then)."""
    if cfg.serve.policy_model is None:
        return None
    from cai.chat_markup import Markup
    from cai.models import load_tokenizer

    markup = Markup.from_tokenizer(load_tokenizer(cfg.serve.policy_model, cfg.cache_dir), name=f"{cfg.serve.policy_model}'s template")
    if markup is None:
        log.warning("serve.policy_model=%s: its chat template does not show its turn markers apart; reading the "
                    "common families' markup instead", cfg.serve.policy_model)
    return markup


def create_app(cfg, judge: Judge, markup=None):
    """The FastAPI app around `judge`; `app.state.batcher` does the work. `markup`: the policy's chat
    markup (policy_markup), read first in OpenRLHF's text."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    serve = cfg.serve
    access = access_rules(cfg)
    batcher = Batcher(judge, serve.max_batch, serve.batch_wait)
    gatherer = GroupGatherer(batcher, serve.group_size, serve.group_wait) if serve.group_size else None

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        # shutdown, in order: no group left waiting, the batch in hand finished, then (serve()) the labeler closed
        if gatherer is not None:
            gatherer.close()
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="cai judge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = Metrics()
    app.state.batcher, app.state.metrics, app.state.judge, app.state.gatherer = batcher, metrics, judge, gatherer

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        path = request.scope["path"]  # what routing uses; request.url.path is built from the Host header
        if path != "/health":
            client = request.scope.get("client")
            if not access.allows(client[0] if client else None, request.headers.get("authorization", "")):
                response = JSONResponse({"error": f"missing or wrong bearer token (send Authorization: Bearer <the "
                                                  f"value of ${serve.token_env}>), and the caller's address is not in "
                                                  "serve.trusted_networks"}, status_code=401)
                metrics.count_request(path, 401, time.perf_counter() - started)
                return response
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > serve.max_request_bytes:
            response = JSONResponse({"error": f"request body of {length} bytes; serve.max_request_bytes is "
                                              f"{serve.max_request_bytes}"}, status_code=413)
        else:
            response = await call_next(request)
        metrics.count_request(path, response.status_code, time.perf_counter() - started)
        return response

    async def read_json(request: Request) -> Any:
        body = b""
        async for chunk in request.stream():  # a chunked body has no Content-Length to check up front
            body += chunk
            if len(body) > serve.max_request_bytes:
                raise RequestError(413, f"request body over serve.max_request_bytes ({serve.max_request_bytes})")
        try:
            return json.loads(body)
        except ValueError as err:
            raise RequestError(400, f"the body is not valid JSON: {err}") from None

    async def scored(items: list[ScoreItem], mode: str) -> list[ScoreResult]:
        if not items:
            return []
        why = (f"not scored within serve.request_timeout={serve.request_timeout:g} s; the labeling goes on "
               "and a retry of the same items is answered from the cache")
        if mode == "group" and gatherer is not None:  # one future per item: its group may close after others
            waiting = gatherer.add(items)
            await asyncio.wait(waiting, timeout=serve.request_timeout)
            results = [w.result() if w.done() else ScoreResult(None, "timeout", why) for w in waiting]
        else:
            try:
                results = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(batcher.submit(items, mode))),
                                                 serve.request_timeout)
            except asyncio.TimeoutError:
                results = [ScoreResult(None, "timeout", why) for _ in items]
        metrics.count_items(results)
        return results

    def error_response(err: RequestError):
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "mode": serve.mode, "labeler": judge.labeler.id, "queued": batcher.pending,
                "principles": judge.reports_principles(), "group_size": serve.group_size}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(judge.usage, batcher.pending))

    @app.post("/v1/score")
    async def score(request: Request):
        try:
            items, mode = _items_from_cai(await read_json(request), serve.max_items)
        except RequestError as err:
            return error_response(err)
        mode = mode or serve.mode
        results = await scored(items, mode)
        return {"mode": mode, "labeler": judge.labeler.id, "principles": judge.reports_principles(mode),
                "failed_reward": judge.failed_reward, "results": [r.as_dict() for r in results]}

    @app.post("/get_reward")
    async def get_reward(request: Request):
        try:
            items = _items_from_openrlhf(await read_json(request), serve.max_items, markup)
        except RequestError as err:
            return error_response(err)
        results = await scored(items, serve.mode)
        fallback = judge.failed_reward
        rewards = [r.reward if r.reward is not None else fallback for r in results]
        extra_logs = {"judge_ok": [1.0 if r.reward is not None else 0.0 for r in results]}
        for pid in judge.reports_principles():  # every key in every answer: OpenRLHF stacks them per sample
            extra_logs[f"principle/{pid}"] = [v if (v := r.principles.get(pid)) is not None else fallback for r in results]
        return {"rewards": rewards, "scores": rewards, "extra_logs": extra_logs, "errors": [r.error for r in results]}

    return app


def serve(cfg) -> None:
    """`cai serve CONFIG`: build the judge, then serve until interrupted."""
    import uvicorn

    access_rules(cfg)  # refuse an open non-loopback bind before any model loads
    judge = Judge(cfg)
    app = create_app(cfg, judge, policy_markup(cfg))
    config = uvicorn.Config(app, host=cfg.serve.host, port=cfg.serve.port, log_level="info", access_log=True)
    server = uvicorn.Server(config)

    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets=sockets)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                print(f"cai serve: {serve_summary(cfg, judge)} on http://{host}:{port}", flush=True)

    server.startup = startup
    try:
        server.run()
    finally:
        usage = judge.usage
        judge.close()  # after the app's shutdown has finished the batch in hand
        print(f"cai serve: stopped; labeler usage {json.dumps(usage)}", flush=True)


def serve_summary(cfg, judge: Judge) -> str:
    m = judge.settings.principles_per_pair
    what = {"pointwise": "pointwise 0-9 ratings" + (" per principle" if cfg.serve.per_principle else ""),
            "pairwise": f"pairwise vs reference ({cfg.serve.reference}), {m} principles x 2 orders",
            "group": f"group win rates, {m} principles x 2 orders per pair"}[cfg.serve.mode]
    if cfg.serve.mode == "group" and cfg.serve.group_size:
        what += f", groups of {cfg.serve.group_size} gathered across requests (wait {cfg.serve.group_wait:g} s)"
    access = access_rules(cfg)
    auth = ", ".join(([f"bearer token from ${cfg.serve.token_env}"] if access.token else [])
                     + ([f"trusted networks {', '.join(cfg.serve.trusted_networks)}"] if access.networks else [])) or "no token"
    return f"{what}, labeler {judge.labeler.id}, constitution {Path(cfg.constitution).name}, {auth}"
