"""The local labeler: a transformers model on this machine, batched, left-padded, seeded.

`LocalGenerator` is also how the policy writes its answers, so the SL stage and the labeler share one
implementation of batched chat generation.
"""

from __future__ import annotations

import hashlib

import torch
from tqdm.auto import tqdm

from cai.labelers.base import Choice, ChoiceRequest, GenerateRequest, Generation, Message, Usage


def _stable_seed(*parts) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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
            batch = self._encode(texts)
            # Seeded by what is asked, not by when: a resumed run samples the same answers.
            torch.manual_seed(_stable_seed(self.seed, texts, [r.sample_index for r in group]))
            sampling = first.temperature > 0
            output = self.model.generate(
                **batch,
                max_new_tokens=max(r.max_new_tokens for r in group),
                do_sample=sampling,
                temperature=first.temperature if sampling else None,
                top_p=first.top_p if sampling else None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
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

    @torch.no_grad()
    def option_probs(self, requests: list[ChoiceRequest], desc: str | None = None) -> list[Choice]:
        """One forward pass per request: the next-token distribution after the answer prefix,
        renormalised over the option tokens. No text is generated."""
        results: list[Choice | None] = [None] * len(requests)
        for indices in self._batches(requests, desc):
            group = [requests[i] for i in indices]
            texts = [self.render(r.messages) + r.answer_prefix for r in group]
            batch = self._encode(texts)
            logits = self.model(**batch).logits[:, -1, :].float()  # left padding: last column is the next token
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, index in enumerate(indices):
                ids = self.option_token_ids(group[row].options, group[row].answer_prefix)
                option_logprobs = logprobs[row, ids]
                probs = torch.softmax(option_logprobs, dim=-1).tolist()
                results[index] = Choice(probs=probs, method="logits", raw=None)
        return results  # type: ignore[return-value]


class LocalLabeler:
    """The labeler protocol over a LocalGenerator."""

    def __init__(self, generator: LocalGenerator, name: str):
        self.generator = generator
        self.id = f"local:{name}"
        self.usage = Usage()

    @classmethod
    def from_config(cls, cfg, shared_models: dict | None = None) -> "LocalLabeler":
        from cai.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(cfg.labeler.model, cfg, shared_models)
        generator = LocalGenerator(
            model, tokenizer, batch_size=cfg.labeler.batch_size, seed=cfg.seed, system_prompt=cfg.labeler.system_prompt
        )
        return cls(generator, cfg.labeler.model)

    def generate(self, requests: list[GenerateRequest], desc: str | None = None) -> list[Generation]:
        results = self.generator.generate(requests, desc)
        self._count(results)
        for r in results:
            self.usage.unparseable += r.status == "unparseable"
        return results

    def choose(self, requests: list[ChoiceRequest], desc: str | None = None) -> list[Choice]:
        results = self.generator.option_probs(requests, desc)
        self.usage.requests += len(results)
        return results

    def _count(self, results: list[Generation]) -> None:
        self.usage.requests += len(results)
        self.usage.input_tokens += sum(r.input_tokens for r in results)
        self.usage.output_tokens += sum(r.output_tokens for r in results)

    def close(self) -> None:
        pass
