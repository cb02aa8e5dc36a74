"""Chat markup in OpenRLHF's text read back (cai/chat_markup.py): for each common family on a real
tokenizer built here with that family's template and special tokens, the text OpenRLHF 0.11 sends (its
prompt as the template wrote it; prompt + answer tokens decoded with special tokens kept) becomes the
user's turn and the answer as plain text, by the family's markers and by the tokenizer's own template."""

from __future__ import annotations

import pytest

from cai.chat_markup import FAMILIES, Markup, clean_answer, split_query, untemplate
from cai.serve import _items_from_openrlhf
from tests.tiny import FAMILY_TEMPLATES, make_family_tokenizer

QUESTION = "How do I bake bread?"
ANSWER = "Mix flour, water, salt and yeast, then knead the dough."


def as_openrlhf_sends(tokenizer, conversation: list[dict], answer_with_end: str) -> tuple[str, str]:
    """(query, prompt) as OpenRLHF 0.11's SingleTurnAgentExecutor makes them."""
    prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(text=prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer_with_end, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(prompt_ids + answer_ids, skip_special_tokens=False), prompt


@pytest.mark.parametrize("family", sorted(FAMILY_TEMPLATES))
@pytest.mark.parametrize("own_template", [False, True])
def test_each_family_reads_back_to_the_users_turn_and_the_plain_answer(family, own_template):
    tokenizer = make_family_tokenizer(family)
    markup = Markup.from_tokenizer(tokenizer) if own_template else None
    if own_template:
        assert markup is not None
    end = FAMILY_TEMPLATES[family]["end"]
    for conversation in ([{"role": "user", "content": QUESTION}],
                         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]):
        query, prompt = as_openrlhf_sends(tokenizer, conversation, ANSWER + end)
        assert ANSWER + end.strip() in query.replace(" " + end, end)  # the end-of-turn token came along
        (item,) = _items_from_openrlhf({"query": [query], "prompts": [prompt], "labels": [""]}, 8, markup)
        assert item.error is None and item.answer == ANSWER
        turns = list(item.prompt)
        assert turns[-1]["role"] == "user" and turns[-1]["content"].endswith(QUESTION)
        assert not any(s in turn["content"] for turn in turns for s in FAMILY_TEMPLATES[family]["specials"])
        if len(conversation) == 2 and family not in ("gemma", "mistral"):  # those two put it in the user turn
            assert {"role": "system", "content": "Be brief."} in turns
        elif len(conversation) == 1 and family != "qwen":  # qwen's template adds a default system turn
            assert turns == [{"role": "user", "content": QUESTION}]
        # an older client sends no prompts: the answer is the turn the query leaves open
        (older,) = _items_from_openrlhf({"query": [query]}, 8, markup)
        assert older.error is None and older.answer == ANSWER and list(older.prompt) == turns


def test_a_template_of_no_known_family_needs_the_policys_own_tokenizer():
    tokenizer = make_family_tokenizer("qwen")
    tokenizer.chat_template = ("{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n<|im_end|>\\n' }}"
                               "{% endfor %}{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}")
    query, prompt = as_openrlhf_sends(tokenizer, [{"role": "user", "content": QUESTION}], ANSWER + "\n<|im_end|>")
    (plain,) = _items_from_openrlhf({"query": [query], "prompts": [prompt]}, 8, None)
    assert plain.prompt[0]["content"].startswith("### user:")  # unknown markup: taken as the user's text
    own = Markup.from_tokenizer(tokenizer)
    (read,) = _items_from_openrlhf({"query": [query], "prompts": [prompt]}, 8, own)
    assert list(read.prompt) == [{"role": "user", "content": QUESTION}] and read.answer == ANSWER


def test_a_query_that_does_not_start_with_its_prompt():
    prompt = "<s>[INST] How do I bake bread? [/INST]"
    # a sentencepiece decode that moved spaces: matched with whitespace aside
    assert split_query("<s>[INST]How do I bake bread?[/INST] Knead it.</s>", prompt) == (" Knead it.</s>", "prefix ignoring whitespace")
    # a prompt cut on the left to fit the context: the query starts with the prompt's end
    answer, how = split_query("do I bake bread? [/INST] Knead it.</s>", prompt)
    assert answer == " Knead it.</s>" and how == "end of a prompt cut on the left"
    # nothing in common: the item fails, saying why, instead of judging the whole query as the answer
    (item,) = _items_from_openrlhf({"query": ["Something else entirely, long enough."], "prompts": [prompt]}, 8)
    assert item.error.startswith("the query does not start with its prompt") and item.answer == ""
    (older,) = _items_from_openrlhf({"query": ["no markup at all"]}, 8)
    assert "no `prompts` were sent" in older.error


def test_an_answer_keeps_html_but_loses_end_of_turn_markers():
    assert clean_answer("Use <s>old</s> tags.<|im_end|>\n<|im_start|>user\nmore", None) == "Use <s>old</s> tags."
    mistral = next(f for f in FAMILIES if f.name == "mistral")
    assert clean_answer("Fine.</s>[INST] next", mistral) == "Fine."
    assert untemplate("just a question").markup is None
