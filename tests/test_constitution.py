"""The constitution format and loader, the shipped constitutions, and the shipped prompt sets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cai.constitution import (
    ComparisonPrinciple,
    Constitution,
    CritiquePrinciple,
    check_files,
    constitution_sha256,
    format_constitution,
    load_constitution,
    sample_principles,
)
from cai.errors import CaiError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "constitutions").glob("*.yaml"))
DATA = ROOT / "cai" / "data"

VALID = """\
name: t
version: 1
critiques:
  - id: harm
    critique: What is harmful here?
    revision: Rewrite it without the harm.
  - id: tone
    critique: Is the tone rude?
    revision: Rewrite it politely.
comparisons:
  - id: less_harmful
    question: Which response is less harmful?
"""
TONE = "critiques[1] (id 'tone'): field "


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(CaiError) as info:
        load_constitution(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(str(path)), message
    return message


# --- shipped constitutions -------------------------------------------------------------------------


def test_constitutions_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"harmless.yaml", "helpful_harmless.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_constitution_loads(path: Path):
    c = load_constitution(path)
    assert c.critiques and c.comparisons
    for section in (c.critiques, c.comparisons):
        ids = [p.id for p in section]
        assert len(ids) == len(set(ids))
    for p in c.critiques:
        assert len(p.critique.split()) <= 40, p.id
        assert c.critique(p.id) is p
    for p in c.comparisons:
        assert c.comparison(p.id) is p
    assert path.read_text().startswith("#"), "each constitution opens with a comment saying what it is"
    assert f"cai constitution check constitutions/{path.name}" in path.read_text()
    assert check_files([path]) == []
    assert c.name in format_constitution(c)


def test_harmless_matches_the_paper_shape():
    c = load_constitution(ROOT / "constitutions" / "harmless.yaml")
    assert len(c.critiques) == 16
    assert len(c.comparisons) == 16
    assert len(c.examples.critique) == 2
    assert sorted(e.answer for e in c.examples.comparison) == ["A", "B"]
    assert all(e.reasoning for e in c.examples.comparison)


def test_tiny_is_tiny():
    c = load_constitution(ROOT / "constitutions" / "tiny.yaml")
    assert (len(c.critiques), len(c.comparisons)) == (2, 2)
    assert (len(c.examples.critique), len(c.examples.comparison)) == (1, 1)


# --- the loader --------------------------------------------------------------------------------------


def test_valid_file_and_lookups(tmp_path):
    path = write(tmp_path, VALID)
    c = load_constitution(path)
    assert c.version == "1"  # a YAML number is kept as text
    assert c.critique("tone").revision == "Rewrite it politely."
    assert c.comparison("less_harmful").question.startswith("Which")
    assert c.examples.critique == [] and c.examples.comparison == []
    with pytest.raises(CaiError, match="no critique principle 'nope'; valid ids: harm, tone"):
        c.critique("nope")
    with pytest.raises(CaiError, match="no comparison principle"):
        c.comparison("harm")


def test_version_float_is_coerced(tmp_path):
    c = load_constitution(write(tmp_path, VALID.replace("version: 1", "version: 1.5")))
    assert c.version == "1.5"
    c = load_constitution(write(tmp_path, VALID + "description:\n"))
    assert c.description == ""


def test_sha256(tmp_path):
    path = write(tmp_path, VALID)
    first = constitution_sha256(path)
    assert len(first) == 64 and first == constitution_sha256(str(path))
    path.write_text(VALID + "# changed\n")
    assert constitution_sha256(path) != first
    with pytest.raises(CaiError):
        constitution_sha256(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("    revision: Rewrite it politely.", "    revision: '   '", TONE + "'revision': must not be empty"),
        ("    revision: Rewrite it politely.", "    revision:", TONE + "'revision': must not be empty"),
        ("  - id: tone", "  - id: harm", "duplicate principle id 'harm' in critiques (entries 0 and 1)"),
        ("  - id: tone", "  - id: Tone Check", "critiques[1] (id 'Tone Check'): field 'id': must be a short"),
        ("critiques:", "critques:", "unknown key 'critques' at top level (did you mean 'critiques'?); valid keys:"),
        (
            "    question: Which response is less harmful?",
            "    question: Which response is less harmful?\n    answer: A",
            "comparisons[0] (id 'less_harmful'): unknown key 'answer'; valid keys: id, question",
        ),
        ("name: t\n", "", "field 'name': is missing"),
        ("    critique: Is the tone rude?", "    critique: 42", TONE + "'critique': must be text, got int 42"),
    ],
)
def test_field_errors_are_one_line(tmp_path, old, new, expected):
    assert old in VALID
    message = load_error(write(tmp_path, VALID.replace(old, new, 1)))
    assert expected in message, message


def test_missing_id_is_named_by_index(tmp_path):
    text = VALID.replace("  - id: tone\n    critique", "  - critique", 1)
    message = load_error(write(tmp_path, text))
    assert "critiques[1]: field 'id': is missing" in message


def test_empty_comparison_question_names_the_principle(tmp_path):
    text = VALID.replace("question: Which response is less harmful?", "question: ''")
    message = load_error(write(tmp_path, text))
    assert "comparisons[0] (id 'less_harmful'): field 'question': must not be empty" in message


def test_duplicate_comparison_ids(tmp_path):
    text = VALID + "  - id: less_harmful\n    question: Again?\n"
    assert "duplicate principle id 'less_harmful' in comparisons (entries 0 and 1)" in load_error(
        write(tmp_path, text)
    )


def test_example_errors(tmp_path):
    text = VALID + (
        "examples:\n"
        "  comparison:\n"
        "    - prompt: p\n      response_a: a\n      response_b: b\n      question: q\n      answer: C\n"
    )
    message = load_error(write(tmp_path, text))
    assert "examples.comparison[0]: field 'answer': must be one of 'A' or 'B', got 'C'" in message
    text = VALID + "examples:\n  critque: []\n"
    expected = "examples: unknown key 'critque' (did you mean 'critique'?); valid keys: critique, comparison"
    assert expected in load_error(write(tmp_path, text))


def test_no_critiques(tmp_path):
    text = "name: t\nversion: '1'\ncritiques: []\n"
    assert "field 'critiques': must list at least one principle" in load_error(write(tmp_path, text))


def test_principle_not_a_mapping(tmp_path):
    text = "name: t\nversion: '1'\ncritiques:\n  - just a sentence\n"
    assert "critiques[0]: must be a mapping" in load_error(write(tmp_path, text))


def test_several_problems_are_counted(tmp_path):
    text = VALID.replace("Rewrite it politely.", "''").replace("Is the tone rude?", "''")
    assert "(and 1 more problem)" in load_error(write(tmp_path, text))


def test_invalid_yaml_names_the_line(tmp_path):
    text = VALID.replace("    question: Which response is less harmful?", "    question: [unclosed")
    message = load_error(write(tmp_path, text))
    assert "line 13: invalid YAML: expected ',' or ']'" in message, message  # where the parser gave up
    text = VALID.replace("  - id: tone", "  - id: tone\n   bad indent: here")
    message = load_error(write(tmp_path, text))
    assert "line 8: invalid YAML" in message, message


def test_duplicate_yaml_key(tmp_path):
    text = VALID.replace("version: 1\n", "version: 1\nname: again\n")
    message = load_error(write(tmp_path, text))
    assert "line 3: invalid YAML: key 'name' appears twice" in message, message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "file is empty"),
        ("   \n\n", "file is empty"),
        ("# only a comment\n", "file is empty"),
        ("- a\n- b\n", "must be a mapping of keys"),
        ("just words\n", "must be a mapping of keys"),
    ],
)
def test_file_level_errors(tmp_path, text, expected):
    assert expected in load_error(write(tmp_path, text))


def test_missing_file(tmp_path):
    assert "not found" in load_error(tmp_path / "nope.yaml")


def test_models_forbid_unknown_fields():
    with pytest.raises(Exception):
        CritiquePrinciple(id="a", critique="c", revision="r", extra="x")
    with pytest.raises(Exception):
        ComparisonPrinciple(id="a", question="")
    with pytest.raises(Exception):
        Constitution(name="n", version="1", critiques=[])


# --- sampling ----------------------------------------------------------------------------------------


def test_sample_principles_is_seeded():
    items = list(range(16))
    assert sample_principles(items, random.Random(0), 5) == sample_principles(items, random.Random(0), 5)
    assert sample_principles(items, random.Random(0), 5) != sample_principles(items, random.Random(1), 5)
    # without replacement when n <= len(items)
    drawn = sample_principles(items, random.Random(3), 16)
    assert sorted(drawn) == items
    # with replacement beyond
    many = sample_principles(items, random.Random(3), 100)
    assert len(many) == 100 and set(many) <= set(items)
    assert sample_principles(items, random.Random(3), 0) == []
    with pytest.raises(CaiError):
        sample_principles([], random.Random(0), 1)


def test_sample_principles_from_a_constitution():
    c = load_constitution(ROOT / "constitutions" / "harmless.yaml")
    picks = sample_principles(c.critiques, random.Random(7), 4)
    assert all(isinstance(p, CritiquePrinciple) for p in picks)
    assert len({p.id for p in picks}) == 4


# --- check_files -------------------------------------------------------------------------------------


def test_check_files_mixes_good_and_bad(tmp_path):
    good = write(tmp_path, VALID, "good.yaml")
    bad = write(tmp_path, VALID.replace("critiques:", "critques:"), "bad.yaml")
    empty = write(tmp_path, "", "empty.yaml")
    missing = tmp_path / "missing.yaml"
    problems = check_files([good, bad, *SHIPPED, empty, missing])
    assert len(problems) == 3
    assert problems[0].startswith(str(bad)) and "critques" in problems[0]
    assert problems[1].startswith(str(empty))
    assert problems[2].startswith(str(missing))
    assert check_files([good, *SHIPPED]) == []


def test_format_lists_every_principle():
    c = load_constitution(ROOT / "constitutions" / "harmless.yaml")
    text = format_constitution(c)
    for p in c.critiques + c.comparisons:
        assert p.id in text
    assert "(16)" in text


# --- prompt sets -------------------------------------------------------------------------------------


def read_prompts(name: str) -> list[str]:
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
    assert all(set(row) == {"prompt"} for row in rows), name
    return [row["prompt"] for row in rows]


@pytest.mark.parametrize("name", ["red_team.jsonl", "helpful.jsonl"])
def test_prompt_sets(name):
    prompts = read_prompts(name)
    assert all(isinstance(p, str) and p.strip() for p in prompts)
    assert len({p.strip().lower() for p in prompts}) == len(prompts) >= 120
    assert max(len(p) for p in prompts) < 300  # one or two sentences


def test_prompt_sets_do_not_overlap():
    red = {p.strip().lower() for p in read_prompts("red_team.jsonl")}
    helpful = {p.strip().lower() for p in read_prompts("helpful.jsonl")}
    assert not red & helpful
