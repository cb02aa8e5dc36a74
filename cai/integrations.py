"""cai's constitutional judge inside other engines' RL loops (docs/serve.md).

- `JudgeClient`: scores items through a running `cai serve` (its `/v1/score`) or a `cai.serve.Judge`
  in this process; the bearer token comes from `$CAI_SERVE_TOKEN` (never an argument).
- `TRLReward`: a TRL reward function for GRPOTrainer (async: TRL awaits it beside its other async
  reward functions); `TRLRewardSync` the same, called without await, for trainers that do so
  (trl.experimental's OnlineDPOTrainer). `TRLReward.per_principle(...)` gives one reward function per
  principle, all answered by one judge call per batch, for `reward_weights` and
  `multi_objective_aggregation="normalize_then_sum"`. A dataset column `reference` is the pairwise
  reference, a column `kind` the prompt's kind.
- `compute_score`: verl's custom reward function (verl 0.9: `reward.custom_reward_function.path=<this
  file>`, `.name=compute_score`), async, so that verl's reward loop awaits it and the many answers in
  flight wait for their groups without holding a thread each. It returns a dict: `score` (the
  aggregate), one key per principle (what `algorithm.gdpo_reward_keys` names for GDPO) and `judge_ok`.
  verl passes no prompt: put it in the dataset's `extra_info["prompt"]`, and the kind in
  `extra_info["kind"]`; `ground_truth` is the pairwise reference. The service's URL comes from
  `reward.custom_reward_function.reward_kwargs.url` or `$CAI_JUDGE_URL`; without one, the judge runs in
  the process from the run config in `reward_kwargs.config` or `$CAI_JUDGE_CONFIG`.
  `compute_score_batch` is the synchronous batch form older verl's batch reward manager calls.

Every adapter gives an item the judge could not score `serve.failed_reward` (by default the mode's
neutral value), never None, and a principle without a verdict the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import urllib.error
import urllib.request

from cai.errors import CaiError
from cai.serve_judge import ScoreItem, ScoreResult

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
        # what the judge reports besides the rewards, learned from its answers (or asked up front)
        self.failed_reward: float | None = judge.failed_reward if judge is not None else None
        self.principles: list[str] | None = judge.reports_principles(mode) if judge is not None else None
        self._batches: dict[str, asyncio.Future | list[ScoreResult]] = {}  # per-principle functions share a call

    # -- the wire ------------------------------------------------------------------------------

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        token = os.environ.get(self.token_env, "").strip()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _payload(self, items: list[ScoreItem], mode: str | None) -> dict:
        payload = {"items": [{"prompt": list(it.prompt) if isinstance(it.prompt, tuple) else it.prompt,
                              "answer": it.answer, "reference": it.reference, "group": it.group, "kind": it.kind}
                             for it in items]}
        if mode is not None:
            payload["mode"] = mode
        return payload

    def _results(self, body: dict) -> list[ScoreResult]:
        self.failed_reward = body.get("failed_reward", self.failed_reward)
        self.principles = body.get("principles", self.principles)
        return [ScoreResult(r["reward"], r["status"], r.get("error"), r.get("details") or {}, r.get("principles") or {})
                for r in body["results"]]

    def _get(self, path: str) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as err:
            raise CaiError(f"cai judge at {self.url}: HTTP {err.code}") from None
        except (urllib.error.URLError, OSError) as err:
            raise CaiError(f"cai judge at {self.url}: {getattr(err, 'reason', err)}") from None

    def principle_ids(self) -> list[str]:
        """The principles each result carries a reward for (asked of the service once)."""
        if self.principles is None:
            self.principles = self._get("/health").get("principles", [])
        return list(self.principles)

    def score(self, items: list[ScoreItem], mode: str | None = None) -> list[ScoreResult]:
        mode = mode or self.mode
        if self.judge is not None:
            with self._lock:
                return self.judge.score(items, mode)
        request = urllib.request.Request(f"{self.url}/v1/score", data=json.dumps(self._payload(items, mode)).encode(),
                                         headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return self._results(json.load(response))
        except urllib.error.HTTPError as err:
            try:
                why = json.load(err).get("error", "")
            except ValueError:
                why = ""
            raise CaiError(f"cai judge at {self.url}: HTTP {err.code} {why}".rstrip()) from None
        except (urllib.error.URLError, OSError) as err:
            raise CaiError(f"cai judge at {self.url}: {getattr(err, 'reason', err)}") from None

    async def ascore(self, items: list[ScoreItem], mode: str | None = None) -> list[ScoreResult]:
        """`score` without holding a thread while the service works (aiohttp): many calls can wait at once,
        as verl's reward loop makes them, each for its group to fill."""
        mode = mode or self.mode
        if self.judge is not None:
            return await asyncio.to_thread(self.score, items, mode)
        import aiohttp

        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
                async with session.post(f"{self.url}/v1/score", json=self._payload(items, mode),
                                        headers=self._headers()) as response:
                    body = await response.json(content_type=None)
                    if response.status != 200:
                        raise CaiError(f"cai judge at {self.url}: HTTP {response.status} {body.get('error', '')}".rstrip())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            raise CaiError(f"cai judge at {self.url}: {type(err).__name__}: {err}") from None
        return self._results(body)

    # -- one judge call per batch, however many reward functions read it ---------------------------

    @staticmethod
    def _batch_key(items: list[ScoreItem], mode) -> str:
        return hashlib.sha256(json.dumps([mode, [(str(it.prompt), it.answer, it.reference, it.kind) for it in items]],
                                         ensure_ascii=False).encode()).hexdigest()

    async def ascore_shared(self, items: list[ScoreItem], mode: str | None = None) -> list[ScoreResult]:
        key = self._batch_key(items, mode)
        if key not in self._batches:
            self._batches = {key: asyncio.ensure_future(self.ascore(items, mode))}  # keeps only the batch in hand
        return await self._batches[key]

    def score_shared(self, items: list[ScoreItem], mode: str | None = None) -> list[ScoreResult]:
        key = self._batch_key(items, mode)
        if key not in self._batches:
            self._batches = {key: self.score(items, mode)}
        return self._batches[key]  # type: ignore[return-value]

    # -- numbers for the engines -----------------------------------------------------------------

    def reward(self, result: ScoreResult, principle: str | None = None) -> float:
        """The aggregate (or one principle's) reward, `failed_reward` where there is none."""
        value = result.reward if principle is None else result.principles.get(principle)
        return float(value) if value is not None else float(self.failed_reward if self.failed_reward is not None else 0.0)


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
    several processes check that (or use pointwise/pairwise). Dataset columns `reference` and `kind` are
    sent with each item. `principle` makes it the reward under that principle alone.
    """

    __name__ = "cai_judge"

    def __init__(self, url: str | None = None, *, judge=None, mode: str | None = None,
                 token_env: str = TOKEN_ENV, timeout: float = 900.0, principle: str | None = None,
                 client: JudgeClient | None = None):
        self.client = client or JudgeClient(url, judge=judge, mode=mode, token_env=token_env, timeout=timeout)
        self.principle = principle
        if principle is not None:
            self.__name__ = principle  # TRL logs it as rewards/<principle>/mean
        self.last_results: list[ScoreResult] = []

    @classmethod
    def per_principle(cls, url: str | None = None, *, judge=None, mode: str | None = None,
                      token_env: str = TOKEN_ENV, timeout: float = 900.0) -> list["TRLReward"]:
        """One reward function per principle of the judge's constitution, sharing one judge call per batch."""
        client = JudgeClient(url, judge=judge, mode=mode, token_env=token_env, timeout=timeout)
        ids = client.principle_ids()
        if not ids:
            raise CaiError("the judge gives no reward per principle in pointwise mode: run it with "
                           "serve.per_principle=true (or in pairwise or group mode)")
        return [cls(principle=pid, client=client) for pid in ids]

    @staticmethod
    def _items(prompts, completions, columns) -> list[ScoreItem]:
        references = columns.get("reference") or [None] * len(prompts)
        kinds = columns.get("kind") or [None] * len(prompts)
        return [ScoreItem(_prompt(p), _text(c), r, kind=k or None)
                for p, c, r, k in zip(prompts, completions, references, kinds)]

    def _numbers(self, results: list[ScoreResult]) -> list[float]:
        self.last_results = results
        return [self.client.reward(r, self.principle) for r in results]

    async def __call__(self, prompts, completions, **columns) -> list[float]:
        return self._numbers(await self.client.ascore_shared(self._items(prompts, completions, columns)))


class TRLRewardSync(TRLReward):
    """TRLReward for trainers that call reward functions without awaiting them (OnlineDPOTrainer)."""

    def __call__(self, prompts, completions, **columns) -> list[float]:  # type: ignore[override]
        return self._numbers(self.client.score_shared(self._items(prompts, completions, columns)))


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
                from cai.serve_judge import Judge

                _clients[key] = JudgeClient(judge=Judge(load_config(config)))
            else:
                raise CaiError("cai compute_score: set the judge's url (reward_kwargs.url or $CAI_JUDGE_URL) "
                               "or a run config to judge in process (reward_kwargs.config or $CAI_JUDGE_CONFIG)")
        return _clients[key]


def _verl_item(solution: str, truth, extra_info) -> ScoreItem:
    if not isinstance(extra_info, dict) or not isinstance(extra_info.get("prompt", extra_info.get("question")), (str, list)):
        raise CaiError("cai compute_score: verl passes no prompt; put it in the dataset's extra_info['prompt']")
    prompt = extra_info.get("prompt", extra_info.get("question"))
    kind = extra_info.get("kind")
    return ScoreItem(_prompt(prompt), solution, truth if isinstance(truth, str) and truth else None,
                     kind=kind if isinstance(kind, str) and kind else None)


def _verl_row(client: JudgeClient, result: ScoreResult) -> dict:
    """What verl's reward managers take from a custom function: `score`, and the other keys as extra info
    (every key in every row: verl stacks them per sample; GDPO reads the per-principle ones)."""
    row = {"score": client.reward(result)}
    for pid in client.principles or []:
        row[pid] = client.reward(result, pid)
    row["judge_ok"] = 1.0 if result.reward is not None else 0.0
    return row


async def compute_score(data_source, solution_str, ground_truth, extra_info=None, *, url: str | None = None,
                        config: str | None = None, mode: str | None = None, **_) -> dict:
    """verl's per-answer reward function (verl 0.9 awaits it): {"score", one key per principle, "judge_ok"}.
    In group mode the service gathers the answers of a prompt (serve.group_size = verl's rollout.n)."""
    client = _client(url, config)
    [result] = await client.ascore([_verl_item(solution_str, ground_truth, extra_info)], mode)
    return _verl_row(client, result)


def compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos, *, url: str | None = None,
                        config: str | None = None, mode: str | None = None, **_) -> list[dict]:
    """The batch form (older verl's batch reward manager): one judge call for the whole batch."""
    client = _client(url, config)
    items = [_verl_item(s, t, i) for s, t, i in zip(solution_strs, ground_truths, extra_infos)]
    return [_verl_row(client, r) for r in client.score(items, mode)]
