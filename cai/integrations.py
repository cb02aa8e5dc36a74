"""cai's constitutional judge inside other engines' RL loops (docs/serve.md).

- `JudgeClient`: scores items through a running `cai serve` (its `/v1/score`) or a `cai.serve.Judge`
  in this process; the bearer token comes from `$CAI_SERVE_TOKEN` (never an argument).
- `TRLReward`: a TRL reward function, `GRPOTrainer(reward_funcs=[TRLReward("http://127.0.0.1:8000")])`.
  It is async, so TRL awaits it beside its other async reward functions; an item the judge could not
  score is None, which TRL turns into NaN and leaves out.
- `compute_score` / `compute_score_batch`: verl's custom reward function
  (`custom_reward_function.path=<this file>`, `.name=compute_score`; with the batch reward manager,
  `compute_score_batch`). verl passes no prompt: put it in the dataset's `extra_info["prompt"]`.
  `ground_truth` is the reference answer in pairwise mode. The service's URL comes from
  `custom_reward_function.reward_kwargs.url` or `$CAI_JUDGE_URL`; without one, the judge runs in the
  process from the run config in `reward_kwargs.config` or `$CAI_JUDGE_CONFIG`.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import urllib.error
import urllib.request

from cai.errors import CaiError
from cai.serve import ScoreItem, ScoreResult

TOKEN_ENV = "CAI_SERVE_TOKEN"


class JudgeClient:
    """Scores through the service at `url`, or through `judge` (a cai.serve.Judge) in this process."""

    def __init__(self, url: str | None = None, *, judge=None, mode: str | None = None,
                 token_env: str = TOKEN_ENV, timeout: float = 900.0):
        if (url is None) == (judge is None):
            raise CaiError("JudgeClient needs either the url of a `cai serve` service or a Judge")
        self.url = url.rstrip("/") if url else None
        self.judge = judge
        self.mode = mode
        self.token_env = token_env
        self.timeout = timeout
        self._lock = threading.Lock()  # an in-process judge (and its labeler) serves one batch at a time

    def score(self, items: list[ScoreItem], mode: str | None = None) -> list[ScoreResult]:
        mode = mode or self.mode
        if self.judge is not None:
            with self._lock:
                return self.judge.score(items, mode)
        payload = {"items": [{"prompt": list(it.prompt) if isinstance(it.prompt, tuple) else it.prompt,
                              "answer": it.answer, "reference": it.reference, "group": it.group} for it in items]}
        if mode is not None:
            payload["mode"] = mode
        headers = {"Content-Type": "application/json"}
        token = os.environ.get(self.token_env, "").strip()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(f"{self.url}/v1/score", data=json.dumps(payload).encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = json.load(response)
        except urllib.error.HTTPError as err:
            try:
                why = json.load(err).get("error", "")
            except ValueError:
                why = ""
            raise CaiError(f"cai judge at {self.url}: HTTP {err.code} {why}".rstrip()) from None
        except (urllib.error.URLError, OSError) as err:
            raise CaiError(f"cai judge at {self.url}: {getattr(err, 'reason', err)}") from None
        return [ScoreResult(r["reward"], r["status"], r.get("error"), r.get("details") or {}) for r in body["results"]]

    async def ascore(self, items: list[ScoreItem], mode: str | None = None) -> list[ScoreResult]:
        return await asyncio.to_thread(self.score, items, mode)


def _text(value) -> str:
    """A completion's text: a plain string, or the content of a conversational completion's last turn."""
    if isinstance(value, list):
        return value[-1]["content"] if value else ""
    return value


def _prompt(value):
    if isinstance(value, list):
        return tuple({"role": m["role"], "content": m["content"]} for m in value)
    return value


class TRLReward:
    """A TRL reward function backed by cai's judge (the service at `url`, or `judge` in process).

    In group mode the answers to one prompt in a call form a group; TRL gives each process the
    completions of whole prompts only when `num_generations` divides the per-process batch, so with
    several processes check that (or use pointwise/pairwise). A dataset column `reference` is sent as
    the pairwise reference.
    """

    __name__ = "cai_judge"

    def __init__(self, url: str | None = None, *, judge=None, mode: str | None = None,
                 token_env: str = TOKEN_ENV, timeout: float = 900.0):
        self.client = JudgeClient(url, judge=judge, mode=mode, token_env=token_env, timeout=timeout)
        self.last_results: list[ScoreResult] = []

    async def __call__(self, prompts, completions, **columns) -> list[float | None]:
        references = columns.get("reference") or [None] * len(prompts)
        items = [ScoreItem(_prompt(p), _text(c), r) for p, c, r in zip(prompts, completions, references)]
        self.last_results = await self.client.ascore(items)
        return [r.reward for r in self.last_results]


# -------------------------------------------------------------------------------------------------
# verl

_clients: dict[tuple, JudgeClient] = {}
_clients_lock = threading.Lock()


def _client(url: str | None, config: str | None) -> JudgeClient:
    url = url or os.environ.get("CAI_JUDGE_URL") or None
    config = config or os.environ.get("CAI_JUDGE_CONFIG") or None
    key = (url, config)
    with _clients_lock:
        if key not in _clients:
            if url:
                _clients[key] = JudgeClient(url)
            elif config:
                from cai.config import load_config
                from cai.serve import Judge

                _clients[key] = JudgeClient(judge=Judge(load_config(config)))
            else:
                raise CaiError("cai compute_score: set the judge's url (reward_kwargs.url or $CAI_JUDGE_URL) "
                               "or a run config to judge in process (reward_kwargs.config or $CAI_JUDGE_CONFIG)")
        return _clients[key]


def _verl_prompt(extra_info) -> str:
    if isinstance(extra_info, dict):
        for key in ("prompt", "question"):
            if isinstance(extra_info.get(key), (str, list)):
                return _prompt(extra_info[key])
    raise CaiError("cai compute_score: verl passes no prompt; put it in the dataset's extra_info['prompt']")


def compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos, *, url: str | None = None,
                        config: str | None = None, mode: str | None = None, **_) -> list[float | None]:
    """verl's batch reward function: one judge call for the whole batch (group mode needs it)."""
    items = [ScoreItem(_verl_prompt(info), solution, truth if isinstance(truth, str) and truth else None)
             for solution, truth, info in zip(solution_strs, ground_truths, extra_infos)]
    return [r.reward for r in _client(url, config).score(items, mode)]


def compute_score(data_source, solution_str, ground_truth, extra_info=None, *, url: str | None = None,
                  config: str | None = None, mode: str | None = None, **_) -> float | None:
    """verl's per-item reward function (pointwise or pairwise: one answer has no group)."""
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info],
                               url=url, config=config, mode=mode)[0]
