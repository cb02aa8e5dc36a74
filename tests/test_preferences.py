"""The preference-label maths (un-flip, orders, ensemble, clamp) with a deterministic fake labeler, and the
local labeler's soft-label path on a tiny model (shared prefixes, both orders batched)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import transformers

from cai.constitution import ComparisonPrinciple, load_constitution
from cai.labelers.base import Choice, ChoiceRequest, Generation
from cai.labelers.local import LocalGenerator, prefix_groups
from cai.preferences import (
    ANSWER_PREFIX,
    JudgeSettings,
    PairItem,
    PairJudgement,
    average_orders,
    clamp,
    draw_comparisons,
    ensemble,
    first_answer_prob,
    judge_pairs,
    position_flip,
)
from cai.templates import Templates
from tests.conftest import ROOT
from tests.fakes import ScriptedLabeler, shown_answers
from tests.test_prefs_rm_stages import sft_run  # noqa: F401 - the sl/sft run fixture

TINY = load_constitution(ROOT / "constitutions/tiny.yaml")
HARMLESS = load_constitution(ROOT / "constitutions/harmless.yaml")


shown = shown_answers  # (response A, response B, question) of a rendered comparison prompt


def biased_judge(good: str = "GOOD", bias: float = 0.1, by_question: dict | None = None):
    """P(A) = 0.5 +- strength for the good answer, plus `bias` toward whatever is shown as (A)."""

    def prefer(text: str) -> float:
        a, b, question = shown(text)
        strength = 0.3
        for key, value in (by_question or {}).items():
            if key in question:
                strength = value
        return 0.5 + strength * ((good in a) - (good in b)) + bias

    return prefer


def settings(**kw) -> JudgeSettings:
    return JudgeSettings(**{"principles_per_pair": 2, **kw})


ITEM = PairItem("p1", [{"role": "user", "content": "Help me?"}], "GOOD answer", "bad answer")


def test_pure_label_maths():
    assert first_answer_prob(0.8, "ab") == 0.8
    assert first_answer_prob(0.8, "ba") == pytest.approx(0.2)
    assert average_orders(0.9, 0.7) == pytest.approx(0.8)
    assert clamp(0.99, (0.4, 0.6)) == 0.6 and clamp(0.01, (0.4, 0.6)) == 0.4 and clamp(0.55, (0.4, 0.6)) == 0.55
    assert ensemble([0.8, None, 0.6]) == pytest.approx(0.7) and ensemble([None]) is None
    assert position_flip(0.9, 0.3) and not position_flip(0.9, 0.7)
    with pytest.raises(ValueError):
        first_answer_prob(0.5, "xy")


def test_unflip_and_average_remove_the_position_bias():
    labeler = ScriptedLabeler(prefer=biased_judge(bias=0.1))
    [verdict] = judge_pairs(labeler, [ITEM], TINY, Templates(), settings=settings())
    for entry in verdict.principles:
        # shown as (A): 0.5 + 0.3 + 0.1; shown as (B): P(A) = 0.5 - 0.3 + 0.1, un-flipped to 0.7
        assert entry["orders"]["ab"]["p_option_a"] == pytest.approx(0.9)
        assert entry["orders"]["ba"]["p_option_a"] == pytest.approx(0.3)
        assert entry["orders"]["ba"]["p_first"] == pytest.approx(0.7)
        assert entry["p_first"] == pytest.approx(0.8)  # the bias is gone
    assert verdict.label == pytest.approx(0.8) and verdict.status == "ok"
    # the mirrored pair gets the mirrored label
    mirrored = PairItem("p2", ITEM.conversation, "bad answer", "GOOD answer")
    [other] = judge_pairs(labeler, [mirrored], TINY, Templates(), settings=settings())
    assert other.label == pytest.approx(0.2)


def test_ensemble_is_the_mean_over_principles():
    labeler = ScriptedLabeler(prefer=biased_judge(bias=0.0, by_question={"less harmful": 0.4, "more helpful": 0.1}))
    [verdict] = judge_pairs(labeler, [ITEM], TINY, Templates(), settings=settings())
    by_id = {e["id"]: e["p_first"] for e in verdict.principles}
    assert by_id == {"less_harmful": pytest.approx(0.9), "more_helpful": pytest.approx(0.6)}
    assert verdict.label == pytest.approx(0.75)


def test_every_question_in_both_orders_in_one_call_with_the_principle_after_the_answers():
    calls = []

    class Recording(ScriptedLabeler):
        def choose(self, requests, desc=None):
            calls.append(requests)
            return super().choose(requests, desc)

    labeler = Recording(prefer=biased_judge())
    items = [ITEM, PairItem("p2", ITEM.conversation, "x GOOD", "y")]
    judge_pairs(labeler, items, TINY, Templates(), settings=settings())
    assert len(calls) == 1 and len(calls[0]) == 2 * 2 * 2  # items x principles x orders
    request = calls[0][0]
    assert request.options == ("A", "B") and request.answer_prefix == ANSWER_PREFIX
    text = request.messages[-1]["content"]
    assert text.index("Response (B)") < text.index("Which of these")
    # the constitution's example comes first, answered the way the labeler should answer
    assert request.messages[1] == {"role": "assistant", "content": "The answer is: (A)"}
    assert len(judge_pairs(labeler, [ITEM], TINY, Templates(), settings=settings(few_shot=False))) == 1
    assert len(calls[-1][0].messages) == 1


def test_chain_of_thought_reasons_first_then_clamps():
    class Reasoner(ScriptedLabeler):
        def generate(self, requests, desc=None):
            self.asked = requests
            return [Generation(text=f"Reasoning number {i}.") for i, _ in enumerate(requests)]

    labeler = Reasoner(prefer=lambda text: 0.99)
    [verdict] = judge_pairs(labeler, [ITEM], TINY, Templates(), settings=settings(chain_of_thought=True))
    assert len(labeler.asked) == 4
    for entry in verdict.principles:
        ab, ba = entry["orders"]["ab"], entry["orders"]["ba"]
        assert ab["reasoning"].startswith("Reasoning number")
        assert ab["p_first"] == 0.6 and ba["p_first"] == 0.4  # 0.99 and 1 - 0.99, clamped to the band
        assert entry["p_first"] == pytest.approx(0.5)
    # the verdict request carries the reasoning as the labeler's own earlier turn
    wide = JudgeSettings(principles_per_pair=2, chain_of_thought=True, cot_clamp=(0.0, 1.0))
    [unclamped] = judge_pairs(labeler, [ITEM], TINY, Templates(), settings=wide)
    assert unclamped.principles[0]["orders"]["ab"]["p_first"] == pytest.approx(0.99)


def test_unreadable_answers_are_kept_counted_and_never_a_label():
    class Picky(ScriptedLabeler):
        def choose(self, requests, desc=None):
            out = []
            for r in requests:
                if "less harmful" in r.messages[-1]["content"]:
                    out.append(Choice(probs=None, method="votes", status="unparseable", raw="I think both"))
                else:
                    out.append(Choice(probs=[0.7, 0.3], method="logits"))
            return out

    [verdict] = judge_pairs(Picky(), [ITEM], TINY, Templates(), settings=settings())
    by_id = {e["id"]: e for e in verdict.principles}
    assert by_id["less_harmful"]["status"] == "unparseable" and by_id["less_harmful"]["p_first"] is None
    assert by_id["less_harmful"]["orders"]["ab"]["raw"] == "I think both"
    assert verdict.label == pytest.approx(0.5) and verdict.status == "ok"  # only the readable principle counts

    class Mute(ScriptedLabeler):
        def choose(self, requests, desc=None):
            return [Choice(probs=None, status="unparseable", raw="?") for _ in requests]

    [none] = judge_pairs(Mute(), [ITEM], TINY, Templates(), settings=settings())
    assert none.label is None and none.status == "unparseable"


def test_principles_are_seeded_distinct_and_capped():
    draws = [p.id for p in draw_comparisons(HARMLESS.comparisons, 0, "pair-1", 4)]
    assert draws == [p.id for p in draw_comparisons(HARMLESS.comparisons, 0, "pair-1", 4)]
    assert len(set(draws)) == 4
    assert draws != [p.id for p in draw_comparisons(HARMLESS.comparisons, 1, "pair-1", 4)]
    assert len(draw_comparisons(TINY.comparisons, 0, "x", 4)) == 2
    own = JudgeSettings(principles=(ComparisonPrinciple(id="q", question="Which is best?"),))
    [verdict] = judge_pairs(ScriptedLabeler(prefer=biased_judge()), [ITEM], TINY, Templates(), settings=own)
    assert [e["id"] for e in verdict.principles] == ["q"]


# -- the local labeler on a tiny model ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_generator():
    from tests.tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    return LocalGenerator(make_tiny_model(tokenizer), tokenizer, batch_size=8)


class Local:
    def __init__(self, generator, share=True):
        self.generator, self.share, self.id = generator, share, "local:tiny"

    def choose(self, requests, desc=None):
        return self.generator.option_probs(requests, share_prefix=self.share)


def test_local_soft_labels_sum_to_one_and_match_single_passes(tiny_generator):
    # pairs of very different lengths: their shared parts are computed in separate batches, then stacked
    long = "A cat and a dog became friends in a small town near the river. " * 6
    items = [ITEM, PairItem("p2", [{"role": "user", "content": "Tell me a story."}], long, "No.")]
    shared = judge_pairs(Local(tiny_generator), items, TINY, Templates(), settings=settings())
    plain = judge_pairs(Local(tiny_generator, share=False), items, TINY, Templates(), settings=settings())
    for s, p in zip(shared, plain):
        assert 0.0 < s.label < 1.0 and s.label == pytest.approx(p.label, abs=1e-5)
        for entry in s.principles:
            for order in ("ab", "ba"):
                assert entry["orders"][order]["method"] == "logits"
    request = ChoiceRequest([{"role": "user", "content": "Which one?"}])
    [choice] = tiny_generator.option_probs([request])
    assert sum(choice.probs) == pytest.approx(1.0, abs=1e-6)
    # one request alone, no padding, no sharing: the reference
    ids = tiny_generator.tokenizer(tiny_generator.render(request.messages) + request.answer_prefix, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = tiny_generator.model(torch.tensor([ids])).logits[0, -1]
    option_ids = tiny_generator.option_token_ids(("A", "B"), request.answer_prefix)
    assert choice.probs == pytest.approx(torch.softmax(logits[option_ids], -1).tolist(), abs=1e-5)


def test_both_orders_share_one_batch_and_principles_share_the_context(tiny_generator, monkeypatch):
    calls = []
    forward = tiny_generator.model.forward

    def counting(*args, **kwargs):
        ids = kwargs["input_ids"]
        calls.append((tuple(ids.shape), kwargs.get("cache") is not None))
        assert "past_key_values" not in kwargs  # deprecated in transformers 5, removed in 5.40
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_generator.model, "forward", counting)
    judge_pairs(Local(tiny_generator), [ITEM], TINY, Templates(), settings=settings())
    # (0) the shared start once; (1) one row per order, both in one batch; (2) one short row per question
    assert [c[0][0] for c in calls] == [1, 2, 4]
    assert [c[1] for c in calls] == [False, True, True]
    assert calls[2][0][1] < calls[1][0][1] // 2 + 40  # suffixes are short next to the shared context


def test_prefix_groups_split_by_prompt_then_order():
    base = [1, 2, 3, 4, 5, 6, 7, 8]
    seqs = []
    for prompt in ([10, 11, 12, 13], [20, 21, 22, 23]):
        for order in ([30, 31, 32, 33, 34, 35], [40, 41, 42, 43, 44, 45]):
            for principle in ([50], [60], [70]):
                seqs.append(base + prompt + order + principle + [99])
    groups = prefix_groups(seqs, [1] * len(seqs))
    assert sorted(len(g) for g, _ in groups) == [3, 3, 3, 3]
    assert all(shared == len(base) + 4 + 6 for _, shared in groups)
    for members, _ in groups:
        assert len({tuple(seqs[i][:18]) for i in members}) == 1


def test_options_that_share_a_first_token_are_scored_as_whole_labels(tiny_generator):
    gen = tiny_generator
    options = ("A", "An")  # "(An" is "(", "A", "n" on the tiny tokenizer
    assert gen.option_continuations(options, "(") is not None
    request = ChoiceRequest([{"role": "user", "content": "Pick one."}], options=options, answer_prefix="(")
    [choice] = gen.option_probs([request])
    base = gen.tokenizer(gen.render(request.messages) + "(", add_special_tokens=False)["input_ids"]
    scores = []
    for continuation in gen.option_continuations(options, "("):
        ids = torch.tensor([base + continuation])
        with torch.no_grad():
            logprobs = torch.log_softmax(gen.model(ids).logits[0], -1)
        scores.append(sum(logprobs[len(base) - 1 + t, tok] for t, tok in enumerate(continuation)))
    assert choice.probs == pytest.approx(torch.softmax(torch.stack(scores), -1).tolist(), abs=1e-5)


def test_chain_of_thought_on_the_local_model(tiny_generator):
    class LocalWithText(Local):
        def generate(self, requests, desc=None):
            return self.generator.generate(requests, desc)

    cot = settings(chain_of_thought=True, reasoning_max_new_tokens=6)
    [verdict] = judge_pairs(LocalWithText(tiny_generator), [ITEM], TINY, Templates(), settings=cot)
    readable = [e for e in verdict.principles if e["status"] == "ok"]
    for entry in readable:
        for order in ("ab", "ba"):
            assert entry["orders"][order]["reasoning"] and 0.4 <= entry["orders"][order]["p_first"] <= 0.6
    assert verdict.status == ("ok" if readable else "unparseable")


class ChangedCache(transformers.DynamicCache):
    """A transformers release whose cache cannot be rebuilt from per-layer tensors, as cai does."""

    def __init__(self, *args, **kwargs):
        if args:
            raise TypeError("DynamicCache() takes no per-layer data any more")
        super().__init__(**kwargs)


def test_failed_prefix_sharing_falls_back_to_full_passes_with_the_same_result(monkeypatch):
    """A transformers release whose cache cannot be rebuilt as cai does: a warning, then the same numbers."""
    from tests.tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    generator = LocalGenerator(make_tiny_model(tokenizer), tokenizer, batch_size=8)
    items = [ITEM, PairItem("p2", [{"role": "user", "content": "Tell me a story."}], "Once upon a time.", "No.")]
    expected = judge_pairs(Local(generator, share=False), items, TINY, Templates(), settings=settings())

    monkeypatch.setattr("cai.labelers.local.DynamicCache", ChangedCache)
    with pytest.warns(RuntimeWarning, match="computing every sequence in full"):
        shared = judge_pairs(Local(generator), items, TINY, Templates(), settings=settings())
    assert [s.label for s in shared] == pytest.approx([e.label for e in expected], abs=1e-5)
    assert generator.share_prefix is False


FEW_SHOT = [
    {"role": "user", "content": "Critique: the response is rude. Please rewrite the response so that it is kind. " * 3},
    {"role": "assistant", "content": "Revision: the response is polite and accurate."},
]


def few_shot_requests(temperature: float) -> list:
    from cai.labelers import GenerateRequest

    asks = ["How do I bake bread?", "Tell me a story about a cat and a dog who became friends.", "Hi", "What is the capital of France?"]
    return [GenerateRequest(FEW_SHOT + [{"role": "user", "content": ask}], max_new_tokens=12, temperature=temperature, sample_index=j)
            for ask in asks for j in range(2)]


def written_tokens(generator, requests) -> list[torch.Tensor]:
    """What generate wrote for each batch (the last max_new_tokens columns): a random tiny model
    mostly writes special tokens, which the answer's text leaves out."""
    outputs = []
    generate = generator.model.generate
    generator.model.generate = lambda *a, **k: outputs.append(generate(*a, **k)) or outputs[-1]
    try:
        generator.generate(requests)
    finally:
        del generator.model.generate
    return [out[:, -requests[0].max_new_tokens :] for out in outputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16: what a GPU user's policy runs in
def test_a_few_shot_batch_computes_its_common_prefix_once_and_writes_what_a_plain_batch_writes(dtype, monkeypatch):
    from tests.tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for weight in model.parameters():  # wider weights than the default init: each prompt gets its own greedy answer
            if weight.dim() == 2:
                weight.data.normal_(0, 0.5)
    generator = LocalGenerator(model.to(dtype), tokenizer, batch_size=8)
    for temperature in (0.0, 0.7):  # greedy, and sampling from the same distributions with the same seed
        generator.share_prefix = False
        plain = written_tokens(generator, few_shot_requests(temperature))
        generator.share_prefix = True
        seen = []  # the shape of every forward pass's input
        forward = generator.model.forward

        @functools.wraps(forward)  # generate reads forward's signature (position_ids) through the wrapper
        def counting_forward(*args, **kwargs):
            seen.append(kwargs["input_ids"].shape)
            return forward(*args, **kwargs)

        monkeypatch.setattr(generator.model, "forward", counting_forward)
        shared = written_tokens(generator, few_shot_requests(temperature))
        monkeypatch.undo()
        assert len(shared) == len(plain) == 1 and torch.equal(shared[0], plain[0])
        assert len(set(map(tuple, plain[0].tolist()))) > 1  # the rows differ: a real comparison
        longest = max(g.input_tokens for g in generator.generate(few_shot_requests(temperature)))
        assert seen[0][0] == 1 and seen[0][1] >= LocalGenerator.MIN_SHARED_TOKENS  # the conversation, once
        assert seen[1][0] == 8 and seen[0][1] + seen[1][1] == longest  # then only what follows it


def test_a_generate_call_that_cannot_share_its_prefix_warns_once_and_writes_the_same(monkeypatch):
    from tests.tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    generator = LocalGenerator(make_tiny_model(tokenizer), tokenizer, batch_size=8)
    generator.share_prefix = False
    expected = written_tokens(generator, few_shot_requests(0.0))
    generator.share_prefix = True

    monkeypatch.setattr("cai.labelers.local.DynamicCache", ChangedCache)
    with pytest.warns(RuntimeWarning, match="generating every prompt in full"):
        shared = written_tokens(generator, few_shot_requests(0.0))
    assert torch.equal(shared[-1], expected[0])
    assert generator.share_prefix is False


# -- a labeler that cannot answer choices ---------------------------------------------------------------


def test_a_first_batch_almost_all_unreadable_stops_with_what_to_try():
    from cai.errors import CaiError
    from cai.labelers.openai_api import OpenAILabeler
    from cai.preferences import check_labeler_reads
    from tests.fake_servers import FakeLLMServer, ScriptedModel

    templates = Templates(ROOT / "prompts")
    items = [PairItem(f"p{i}", [{"role": "user", "content": "Help me?"}], "GOOD answer", "bad answer") for i in range(3)]
    mute = ScriptedModel(["I", " think", " both", " replies", " are", " fine", "."])
    answers = ScriptedModel(["The", " answer", " is", ":", " (", "B", ")"], {5: {"B": -0.2, "A": -1.8}})
    for model in (mute, answers):
        with FakeLLMServer(model=model) as server:
            labeler = OpenAILabeler("smollm2", base_url=server.openai_url, vote_samples=2, max_parse_retries=0,
                                    price=(0.0, 0.0), backoff_base=0.01, start_interval=0.0)
            verdicts = judge_pairs(labeler, items, TINY, templates, settings=settings())
            asked = labeler.usage.extra["choice_asked"]
            labeler.close()
        if model is answers:  # readable: no stop
            check_labeler_reads(verdicts, labeler.id, asked, "auto")
            continue
        assert all(v.status == "unparseable" for v in verdicts)
        with pytest.raises(CaiError) as err:
            check_labeler_reads(verdicts, labeler.id, asked, "auto")
        message = str(err.value)
        assert "\n" not in message and "6 of 6 principle questions of the first batch" in message
        assert "I think both replies are fine." in message and "no prefill" in message
        assert "labeler.choice_method=votes" in message and "larger labeler.model" in message


def test_a_few_unreadable_questions_do_not_stop():
    from cai.preferences import check_labeler_reads

    def verdict(statuses):
        orders = {o: {"status": s, "raw": "?"} for o, s in zip(("ab", "ba"), statuses)}
        return PairJudgement("x", None, "ok", [{"status": "ok" if set(statuses) == {"ok"} else "unparseable", "orders": orders}])

    some = [verdict(("ok", "ok"))] * 2 + [verdict(("unparseable", "ok"))] * 8  # 80% unreadable: go on
    check_labeler_reads(some, "x", None, "auto")
    with pytest.raises(Exception, match="9 of 10"):
        check_labeler_reads([verdict(("ok", "ok"))] + [verdict(("unparseable", "ok"))] * 9, "x", None, "votes")


def test_prefs_stage_stops_after_a_first_batch_it_cannot_read(sft_run, tmp_path):
    # the whole stage against a server whose model never writes a label: one clear line, early
    from cai.errors import CaiError
    from cai.records import mark_done, read_jsonl
    from cai.stages import prefs, stage_fingerprint
    from tests.fake_servers import FakeLLMServer, ScriptedModel
    from tests.test_prefs_rm_stages import copy_run

    make = copy_run(sft_run, tmp_path / "run", ("sl", "sft"))
    mute = ScriptedModel(["I", " think", " both", " replies", " are", " fine", "."])
    with FakeLLMServer(model=mute) as server:
        cfg = make("labeler.backend=openai", f"labeler.base_url={server.openai_url}", "labeler.model=smollm2",
                   "labeler.vote_samples=2", "labeler.max_parse_retries=0", "labeler.batch_size=2",
                   "prefs.samples_per_prompt=3")
        for stage in ("sl", "sft"):  # as if sl and sft had been made with this labeler too
            mark_done(tmp_path / "run" / stage, stage_fingerprint(cfg, stage))
        with pytest.raises(CaiError, match="gave no readable choice for .* of the first batch") as err:
            prefs.run(cfg)
        asked = len(server.requests)
    assert "I think both replies are fine." in str(err.value)
    out = tmp_path / "run" / "prefs"
    assert not read_jsonl(out / "records.jsonl")  # the unreadable batch is not recorded: a rerun asks again
    usage = json.loads((out / "labeler_usage.json").read_text())
    assert "no prefill" in usage["choice_asked"] and usage["vote_fallbacks"] == 2 * 2 * 2
    assert asked < 2 * 2 * 2 * (1 + 2) + 5  # the first batch only: 2 pairs, 2 principles, 2 orders
