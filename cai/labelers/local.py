"""The local labeler: a transformers model on this machine, batched, left-padded, seeded.

`LocalGenerator` is also how the policy writes its answers, so the SL stage and the labeler share one
implementation of batched chat generation.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from cai.labelers.base import Choice, ChoiceRequest, GenerateRequest, Generation, Message, Usage
from cai.models import sampling_kwargs
from cai.seeding import stable_seed


# What a model or transformers release whose key/value cache cannot be reused as cai does raises.
SHARING_ERRORS = (TypeError, ValueError, AttributeError, IndexError, KeyError, RuntimeError)


class LocalGenerator:
    """Batched chat generation with one model and tokenizer (left padding, seeded sampling)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, seed: int = 0, system_prompt: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.system_prompt = system_prompt
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (cai.models.load_tokenizer sets one)")
        tokenizer.padding_side = "left"
        self._continuations: dict = {}  # (options, answer prefix) -> option_continuations' answer
        parameters = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in parameters
        # transformers 5 renamed the key/value cache argument `past_key_values` -> `cache` (the old name
        # is deprecated and goes in 5.40); a model whose forward still takes only the old name gets it.
        self._cache_argument = "cache" if "cache" in parameters or "past_key_values" not in parameters else "past_key_values"
        self.share_prefix = True  # turned off, with a warning, the first time sharing a prefix fails
        # Generation shares a prefix by padding between it and the rest of each prompt, which is right only
        # when generate can pass positions computed from the mask (every current decoder's forward takes them).
        self._takes_positions = "position_ids" in parameters

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def close(self) -> None:
        """Nothing to release (the weights go with the generator); the policy samplers' common protocol."""

    def _with_system(self, messages: list[Message]) -> list[Message]:
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            self._with_system(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode(self, texts: list[str]) -> dict:
        # The chat template already wrote any BOS token, so none is added here.
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _batches(self, requests: list, desc: str | None):
        # Longest first within the list keeps padding small; results go back in request order.
        order = sorted(range(len(requests)), key=lambda i: -len(str(requests[i].messages)))
        bar = tqdm(total=len(requests), desc=desc, disable=desc is None, leave=False)
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            yield indices
            bar.update(len(indices))
        bar.close()

    @torch.no_grad()
    def generate(self, requests: list[GenerateRequest], desc: str | None = None) -> list[Generation]:
        results: list[Generation | None] = [None] * len(requests)
        for indices in self._batches(requests, desc):
            group = [requests[i] for i in indices]
            first = group[0]
            texts = [self.render(r.messages) for r in group]
            settings = dict(
                max_new_tokens=max(r.max_new_tokens for r in group),
                pad_token_id=self.tokenizer.pad_token_id,
                # exactly softmax(logits / T) within top-p: none of the model's shipped penalties
                **sampling_kwargs(first.temperature, first.top_p),
            )
            # Seeded by what is asked, not by when: a resumed run samples the same answers.
            seed = stable_seed(self.seed, texts, [r.sample_index for r in group])
            shared = self._generate_shared(texts, seed, settings)
            if shared is not None:
                batch, new_tokens = shared
            else:
                batch = self._encode(texts)
                torch.manual_seed(seed)
                new_tokens = self.model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
            for row, index in enumerate(indices):
                tokens = new_tokens[row]
                n_out = int((tokens != self.tokenizer.pad_token_id).sum())
                text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                results[index] = Generation(
                    text=text,
                    status="ok" if text else "unparseable",
                    error=None if text else "empty answer",
                    input_tokens=int(batch["attention_mask"][row].sum()),
                    output_tokens=n_out,
                )
        return results  # type: ignore[return-value]

    def _stop_sharing(self, err: Exception, fallback: str) -> None:
        """Sharing leans on the model's cache API, which transformers keeps changing: the first failure
        turns it off for good, with one warning, and the caller computes the same thing without it."""
        self.share_prefix = False
        warnings.warn(
            f"local labeler: sharing the key/value cache of common prefixes failed ({type(err).__name__}: {err}); {fallback}",
            RuntimeWarning,
            stacklevel=3,
        )

    # The shortest prefix worth computing once for a whole batch: a few-shot conversation (the SL
    # stage's worked critiques and revisions, ~850 tokens before a ~140-token request) or N samples of
    # one prompt. Below it the saving does not pay for the extra pass.
    MIN_SHARED_TOKENS = 32

    def _generate_shared(self, texts: list[str], seed: int, settings: dict):
        """Sample a batch whose prompts begin with the same tokens, computing those tokens once.

        The common prefix goes through the model once (batch 1); its key/value cache is copied to every
        row, and each prompt's remaining tokens follow it, padded on their left (padding between the
        prefix and the rest, masked; positions from the mask, as generate computes them), so every row
        sees what a left-padded batch would. SL-CAI's revisions on the demo (batches of 16 few-shot prompts)
        run 2.4 times as fast. Returns (encoded batch, new tokens), or None when there is nothing worth
        sharing or sharing fails (the caller then generates plainly; a failure warns once).
        """
        if not (self.share_prefix and self._takes_positions) or len(texts) < 2:
            return None
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        common = min(min(_common_length(ids[0], other) for other in ids[1:]), min(len(x) for x in ids) - 1)
        if common < self.MIN_SHARED_TOKENS:
            return None
        try:
            head, head_cache = self._prefix_cache(ids[0][:common])
            rest, rest_mask = self._pad([x[common:] for x in ids], "left")
            input_ids = torch.cat([head.expand(len(ids), -1), rest], 1)
            attention_mask = torch.cat([torch.ones_like(head).expand(len(ids), -1), rest_mask], 1)
            torch.manual_seed(seed)
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **{self._cache_argument: self._select(head_cache, [0] * len(ids))},
                **settings,
            )
        except SHARING_ERRORS as err:
            self._stop_sharing(err, "generating every prompt in full instead (slower)")
            return None
        return {"input_ids": input_ids, "attention_mask": attention_mask}, output[:, input_ids.shape[1] :]

    def option_token_ids(self, options: tuple[str, ...], answer_prefix: str) -> list[int]:
        """The token that starts each option right after the answer prefix (e.g. "A" after "(")."""
        base = self.tokenizer.encode(answer_prefix, add_special_tokens=False)
        ids = []
        for option in options:
            full = self.tokenizer.encode(answer_prefix + option, add_special_tokens=False)
            if full[: len(base)] != base or len(full) == len(base):
                raise ValueError(f"option {option!r} does not tokenize cleanly after {answer_prefix!r}")
            ids.append(full[len(base)])
        if len(set(ids)) != len(ids):
            raise ValueError(f"options {options} share their first token after {answer_prefix!r}")
        return ids

    def option_continuations(self, options: tuple[str, ...], answer_prefix: str) -> list[list[int]] | None:
        """How each option is scored, as the tokens that follow the answer prefix.

        None when every option is one distinct token there (the usual "(A)"/"(B)" case): one
        next-token distribution scores them all. Otherwise (SmolLM2 writes "10" as "1", "0") each option
        is scored as the whole label plus its closing bracket, "(10)" against "(1)", so that "1" is not
        mistaken for the start of "10".
        """
        key = (tuple(options), answer_prefix)
        if key in self._continuations:
            return self._continuations[key]
        try:
            self.option_token_ids(options, answer_prefix)
            result = None
        except ValueError:
            closer = {"(": ")", "[": "]"}.get(answer_prefix.rstrip()[-1:], "")
            if not closer:
                raise ValueError(
                    f"options {options} are not single distinct tokens after {answer_prefix!r}, and the prefix "
                    "does not open a bracket that would mark where an option ends"
                ) from None
            base = self.tokenizer.encode(answer_prefix, add_special_tokens=False)
            result = []
            for option in options:
                full = self.tokenizer.encode(answer_prefix + option + closer, add_special_tokens=False)
                if full[: len(base)] != base or len(full) == len(base):
                    raise ValueError(f"option {option!r} does not tokenize cleanly after {answer_prefix!r}") from None
                result.append(full[len(base) :])
        self._continuations[key] = result
        return result

    @torch.no_grad()
    def option_probs(self, requests: list[ChoiceRequest], desc: str | None = None, share_prefix: bool = True) -> list[Choice]:
        """Option probabilities from the model's next-token distribution after each answer prefix,
        renormalised over the options. No text is generated.

        Requests that begin with the same tokens share their forward pass over those tokens
        (`share_prefix`, see `tail_logprobs`): asking M principles about one pair in both orders costs
        one pass over the conversation and both answers per order, plus a short suffix per principle.
        """
        sequences: list[list[int]] = []
        tails: list[int] = []
        plans = []  # per request: (continuations or None, option token ids or None, sequence indices)
        for request in requests:
            text = self.render(request.messages) + request.answer_prefix
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            continuations = self.option_continuations(request.options, request.answer_prefix)
            if continuations is None:
                plans.append((None, self.option_token_ids(request.options, request.answer_prefix), [len(sequences)]))
                sequences.append(ids)
                tails.append(1)
            else:
                plans.append((continuations, None, list(range(len(sequences), len(sequences) + len(continuations)))))
                for tokens in continuations:
                    sequences.append(ids + tokens)
                    tails.append(len(tokens) + 1)
        rows = self.tail_logprobs(sequences, tails, share_prefix=share_prefix, desc=desc)
        results = []
        for continuations, token_ids, indices in plans:
            if continuations is None:
                scores = rows[indices[0]][-1, token_ids]
            else:
                # log P(option tokens) = the sum over its tokens; row t predicts token t.
                scores = torch.stack(
                    [rows[i][torch.arange(len(c)), torch.tensor(c)].sum() for i, c in zip(indices, continuations)]
                )
            results.append(Choice(probs=torch.softmax(scores, dim=-1).tolist(), method="logits", raw=None))
        return results

    # -- forward passes that share common prefixes ------------------------------------------------

    def _forward(self, input_ids, attention_mask, position_ids, past=None, keep: int = 1):
        kwargs = {"logits_to_keep": keep} if self._keeps_logits else {}
        if past is not None:
            kwargs[self._cache_argument] = past
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **kwargs)
        cache = out.get("cache") if "cache" in out else out.get("past_key_values")
        return out.logits[:, -keep:, :].float(), cache

    def _prefix_cache(self, tokens: list[int]):
        """One pass over a prefix shared by many sequences: ([1, len] token ids, its key/value cache)."""
        head = torch.tensor([tokens], device=self.device)
        _, cache = self._forward(head, torch.ones_like(head), torch.arange(len(tokens), device=self.device)[None])
        return head, cache

    def _pad(self, pieces: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in pieces)
        ids = torch.full((len(pieces), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(pieces), width), dtype=torch.long)
        for row, piece in enumerate(pieces):
            if piece:
                span = slice(0, len(piece)) if side == "right" else slice(width - len(piece), width)
                ids[row, span] = torch.tensor(piece)
                mask[row, span] = 1
        return ids.to(self.device), mask.to(self.device)

    @staticmethod
    def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) of each layer, [batch, heads, seq, dim], through the cache's documented iteration."""
        return [(entry[0], entry[1]) for entry in cache]

    def _cache(self, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        """A DynamicCache filled with (keys, values) per layer, its documented constructor."""
        return DynamicCache(layers, config=self.model.config)

    def _select(self, cache, index: list[int]):
        """A new cache holding rows `index` of `cache` (the same row may appear many times)."""
        rows = torch.tensor(index, device=self.device)
        return self._cache([(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self._layers(cache)])

    @torch.no_grad()
    def tail_logprobs(
        self, sequences: list[list[int]], tails: list[int], share_prefix: bool = True, desc: str | None = None
    ) -> list[torch.Tensor]:
        """Log-probabilities over the vocabulary at the last `tails[i]` positions of each token sequence
        (row t predicts the token after position len - tails[i] + t), as a [tails[i], vocab] tensor.

        With `share_prefix`, sequences are grouped by common prefix (`prefix_groups`) and computed in
        three batched passes per chunk of groups, reusing the key/value cache: (0) the prefix common to
        the whole chunk, once; (1) each group's own shared part, one row per group; (2) each sequence's
        remaining suffix. Padding is masked and positions are given explicitly, so the result equals one
        plain forward pass per sequence. Without it: left-padded batches of whole sequences.

        Sharing leans on the model's cache API, which transformers keeps changing; when it fails (a model
        whose cache cannot be rebuilt or reused this way, a transformers release that changed it) the
        generator warns once and computes the rest without sharing, which gives the same numbers.
        """
        out: list[torch.Tensor | None] = [None] * len(sequences)
        bar = tqdm(total=len(sequences), desc=desc, disable=desc is None, leave=False)
        if not (share_prefix and self.share_prefix):
            self._plain_tails(sequences, tails, list(range(len(sequences))), out, bar)
        else:
            # Longest shared parts first, so that a chunk's groups have similar lengths.
            groups = sorted(prefix_groups(sequences, tails), key=lambda group: -group[1])
            for chunk in self._chunks(groups):
                members = [i for group, _ in chunk for i in group]
                if self.share_prefix:
                    try:
                        self._shared_tails(sequences, tails, chunk, out, bar)
                        continue
                    except SHARING_ERRORS as err:
                        self._stop_sharing(err, "computing every sequence in full instead (same result, slower)")
                self._plain_tails(sequences, tails, [i for i in members if out[i] is None], out, bar)
        bar.close()
        return out  # type: ignore[return-value]

    def _chunks(self, groups: list[tuple[list[int], int]]):
        """Consecutive groups, at most batch_size groups and 4 x batch_size sequences at a time."""
        chunk: list[tuple[list[int], int]] = []
        for group in groups:
            if chunk and (len(chunk) >= self.batch_size or sum(len(g) for g, _ in chunk) + len(group[0]) > 4 * self.batch_size):
                yield chunk
                chunk = []
            chunk.append(group)
        if chunk:
            yield chunk

    def _keep_tails(self, logits: torch.Tensor, indices: list[int], tails: list[int], out: list) -> None:
        keep = logits.shape[1]
        for row, i in enumerate(indices):
            out[i] = torch.log_softmax(logits[row, keep - tails[i] :], dim=-1).cpu()

    def _plain_tails(self, sequences, tails, indices: list[int], out: list, bar) -> None:
        order = sorted(indices, key=lambda i: -len(sequences[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            ids, mask = self._pad([sequences[i] for i in batch], "left")
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits, _ = self._forward(ids, mask, positions, keep=max(tails[i] for i in batch))
            self._keep_tails(logits, batch, tails, out)
            bar.update(len(batch))

    def _shared_tails(self, sequences, tails, chunk: list[tuple[list[int], int]], out: list, bar) -> None:
        members = [i for group, _ in chunk for i in group]
        first = sequences[members[0]]
        common = min(shared for _, shared in chunk)
        for i in members[1:]:
            common = min(common, _common_length(first, sequences[i]))
        if common == 0:  # nothing shared at all (not even a chat template's first token)
            self._plain_tails(sequences, tails, members, out, bar)
            return
        n_groups = len(chunk)
        # (0) the prefix that the whole chunk shares, once
        _, head_cache = self._prefix_cache(first[:common])
        # (1) each group's shared part after it: batches of similar length (the two orders of a pair
        # are almost the same length), right-padded; their caches are then zero-padded to one length
        # and stacked, the padding masked, so that no forward pass is spent on padding.
        parts = [sequences[group[0]][common:shared] for group, shared in chunk]
        width = max(len(part) for part in parts)
        keys: list[list[torch.Tensor]] = []
        values: list[list[torch.Tensor]] = []
        masks = []
        start = 0
        while start < n_groups:
            end = start + 1
            while end < n_groups and end - start < self.batch_size and len(parts[end]) >= 0.9 * len(parts[start]) - 8:
                end += 1
            bucket = parts[start:end]
            past = self._select(head_cache, [0] * len(bucket))
            ones = torch.ones((len(bucket), common), dtype=torch.long, device=self.device)
            if any(bucket):
                ids, mask = self._pad(bucket, "right")
                positions = common + torch.arange(ids.shape[1], device=self.device)[None].expand(len(bucket), -1)
                _, past = self._forward(ids, torch.cat([ones, mask], 1), positions, past=past)
            else:
                mask = ones[:, :0]
            extra = width - mask.shape[1]
            masks.append(torch.nn.functional.pad(mask, (0, extra)))
            pad = (0, 0, 0, extra)  # the sequence axis of [batch, heads, seq, dim]
            layers = self._layers(past)
            keys.append([torch.nn.functional.pad(k, pad) for k, _ in layers])
            values.append([torch.nn.functional.pad(v, pad) for _, v in layers])
            start = end
        cache = self._cache(
            [(torch.cat([k[n] for k in keys]), torch.cat([v[n] for v in values])) for n in range(len(keys[0]))]
        )
        part_mask = torch.cat(masks)
        # (2) each sequence's own suffix, left-padded so that its tail comes last, in batches
        rows = [(i, g) for g, (group, _) in enumerate(chunk) for i in group]
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            owners = [g for _, g in batch]
            ids, suffix_mask = self._pad([sequences[i][chunk[g][1] :] for i, g in batch], "left")
            mask = torch.cat([suffix_mask.new_ones((len(batch), common)), part_mask[owners], suffix_mask], 1)
            starts = torch.tensor([chunk[g][1] for g in owners], device=self.device)[:, None]
            positions = starts + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
            logits, _ = self._forward(
                ids, mask, positions, past=self._select(cache, owners), keep=max(tails[i] for i, _ in batch)
            )
            self._keep_tails(logits, [i for i, _ in batch], tails, out)
            bar.update(len(batch))


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(sequences: list[list[int]], tails: list[int]) -> list[tuple[list[int], int]]:
    """Group sequences that share a prefix worth computing once: [(indices, shared length)].

    Sorted token sequences put common prefixes next to each other, and the common prefix of a run is
    the smallest common length of neighbours. A run is split where that length is smallest (between two
    prompts first, then between two presentation orders, ...) for as long as splitting costs fewer token
    positions: a group of n sequences sharing L tokens costs L + sum(len - L). Each group keeps at
    least `tails[i]` tokens of each sequence out of its shared part, so every suffix is non-empty.
    """
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    links = [_common_length(sequences[a], sequences[b]) for a, b in zip(order, order[1:])]

    def shared(lo: int, hi: int) -> int:  # positions order[lo:hi]
        limit = min(len(sequences[order[k]]) - tails[order[k]] for k in range(lo, hi))
        run = min(links[lo : hi - 1]) if hi - lo > 1 else len(sequences[order[lo]])
        return max(0, min(run, limit))

    def cost(lo: int, hi: int, base: int) -> int:
        length = shared(lo, hi)
        return max(0, length - base) + sum(len(sequences[order[k]]) - length for k in range(lo, hi))

    def split(lo: int, hi: int, base: int) -> list[tuple[int, int]]:
        if hi - lo < 2:
            return [(lo, hi)]
        weakest = min(links[lo : hi - 1])
        cuts = [lo] + [k + 1 for k in range(lo, hi - 1) if links[k] == weakest] + [hi]
        parts = list(zip(cuts, cuts[1:]))
        if len(parts) < 2 or sum(cost(a, b, base) for a, b in parts) >= cost(lo, hi, base):
            return [(lo, hi)]
        return [piece for a, b in parts for piece in split(a, b, base)]

    base = shared(0, len(order))
    return [([order[k] for k in range(lo, hi)], shared(lo, hi)) for lo, hi in split(0, len(order), base)]


class LocalLabeler:
    """The labeler protocol over a LocalGenerator.

    Requests go to the generator one batch at a time, and each batch's answers are handed to
    `on_result` as soon as it is done: the cache wrapper stores them then, so a kill loses at most
    the batch in flight.
    """

    def __init__(self, generator: LocalGenerator, name: str, model_path: str | None = None):
        self.generator = generator
        self.id = f"local:{name}"
        self.usage = Usage()
        self.model_path = model_path

    @classmethod
    def from_config(cls, cfg, shared_models: dict | None = None) -> "LocalLabeler":
        from cai.models import load_model_and_tokenizer, resolve_model

        model, tokenizer = load_model_and_tokenizer(cfg.labeler.model, cfg, shared_models)
        generator = LocalGenerator(
            model, tokenizer, batch_size=cfg.labeler.batch_size, seed=cfg.seed, system_prompt=cfg.labeler.system_prompt
        )
        return cls(generator, cfg.labeler.model, resolve_model(cfg.labeler.model, cfg.cache_dir))

    def cache_params(self, kind: str) -> dict:
        """What, besides the request, changes a local answer: the weights, the seed, the system prompt."""
        weights = []
        if self.model_path and Path(self.model_path).is_dir():
            weights = sorted(
                (p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in Path(self.model_path).glob("*.safetensors")
            )
        return {"id": self.id, "weights": weights, "seed": self.generator.seed, "system": self.generator.system_prompt}

    def _too_long(self, request) -> str | None:
        """Why the model cannot read `request` (more tokens than its positions), or None."""
        limit = getattr(self.generator.model.config, "max_position_embeddings", None)
        if not isinstance(limit, int):
            return None
        text = self.generator.render(request.messages) + (getattr(request, "answer_prefix", "") or "")
        n = len(self.generator.tokenizer(text, add_special_tokens=False)["input_ids"])
        return f"{n} tokens, more than the labeler model reads (max_position_embeddings={limit})" if n > limit else None

    def _one_by_one(self, method, requests: list, failed) -> list:
        """Each request alone (after a batch failed), so that one bad request fails alone."""
        out = []
        for request in requests:
            try:
                out.append(method([request], None)[0])
            except (RuntimeError, ValueError, IndexError) as err:  # torch's errors, out of memory included
                out.append(failed(self._too_long(request) or f"{type(err).__name__}: {err}"[:300]))
        return out

    def _in_batches(self, method, requests: list, desc: str | None, on_result) -> list:
        """`method` over batches; a batch that raises (a request longer than a model with learned positions
        reads, out of memory) is asked again one request at a time, and only a request that raises alone fails."""
        failed = (lambda why: Choice(None, status="failed", error=why)) if method == self.generator.option_probs \
            else (lambda why: Generation(None, status="failed", error=why))
        results: list = []
        size = self.generator.batch_size
        with tqdm(total=len(requests), desc=desc, disable=desc is None, leave=False) as bar:
            for start in range(0, len(requests), size):
                batch = requests[start : start + size]
                try:
                    chunk = method(batch, None)
                except (RuntimeError, ValueError, IndexError):
                    chunk = self._one_by_one(method, batch, failed)
                for offset, result in enumerate(chunk):
                    if on_result is not None:
                        on_result(start + offset, result)
                results += chunk
                bar.update(len(chunk))
        return results

    def generate(
        self, requests: list[GenerateRequest], desc: str | None = None, on_result: Callable | None = None, **_
    ) -> list[Generation]:
        results = self._in_batches(self.generator.generate, requests, desc, on_result)
        self.usage.requests += len(results)
        self.usage.input_tokens += sum(r.input_tokens for r in results)
        self.usage.output_tokens += sum(r.output_tokens for r in results)
        self.usage.unparseable += sum(r.status == "unparseable" for r in results)
        self.usage.failed += sum(r.status == "failed" for r in results)
        return results

    def choose(
        self, requests: list[ChoiceRequest], desc: str | None = None, on_result: Callable | None = None, **_
    ) -> list[Choice]:
        results = self._in_batches(self.generator.option_probs, requests, desc, on_result)
        self.usage.requests += len(results)
        self.usage.failed += sum(r.status == "failed" for r in results)
        return results

    def close(self) -> None:
        pass
