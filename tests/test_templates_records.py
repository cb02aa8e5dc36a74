"""Templates (strict, overridable per file) and crash-safe records."""

from __future__ import annotations

import json

import pytest

from cai.errors import CaiError
from cai.records import JsonlWriter, atomic_write_text, read_jsonl
from cai.templates import SHIPPED_PROMPTS, Templates


def test_shipped_templates_render_and_document_their_variables():
    t = Templates()
    text = t.render("revision.jinja", prompt="P?", response="R.", critique_request="CR", critique="C", revision_request="RR")
    for part in ("P?", "R.", "CR", "C", "RR"):
        assert part in text
    for path in SHIPPED_PROMPTS.glob("*.jinja"):
        assert path.read_text().startswith("{#"), f"{path.name} needs a header comment listing its variables"


def test_missing_variable_names_template_and_variable():
    with pytest.raises(CaiError, match=r"critique.jinja: 'critique_request' is undefined"):
        Templates().render("critique.jinja", prompt="p", response="r")


def test_override_folder_replaces_one_file(tmp_path):
    (tmp_path / "critique.jinja").write_text("MY CRITIQUE {{ prompt }}")
    t = Templates(tmp_path)
    assert t.render("critique.jinja", prompt="x") == "MY CRITIQUE x"
    assert "Critique:" in t.render("revision.jinja", prompt="p", response="r", critique_request="c", critique="c", revision_request="r")
    assert t.fingerprint(["critique.jinja"]) != Templates().fingerprint(["critique.jinja"])


def test_template_syntax_error_gives_the_line(tmp_path):
    (tmp_path / "critique.jinja").write_text("ok\n{{ prompt \n")
    with pytest.raises(CaiError, match=r"critique.jinja: line \d+: template syntax error"):
        Templates(tmp_path).render("critique.jinja", prompt="x")


def test_missing_override_folder(tmp_path):
    with pytest.raises(CaiError, match="does not exist"):
        Templates(tmp_path / "nope")


def test_torn_last_record_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "r.jsonl"
    with JsonlWriter(path) as w:
        w.write({"id": 1})
        w.write({"id": 2})
    with open(path, "a") as f:
        f.write('{"id": 3, "half')  # what a kill mid-write leaves
    assert [r["id"] for r in read_jsonl(path)] == [1, 2]
    read_jsonl(path, repair=True)
    with JsonlWriter(path) as w:
        w.write({"id": 3})
    assert [r["id"] for r in read_jsonl(path)] == [1, 2, 3]


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(CaiError, match="line 2"):
        read_jsonl(path)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a.json", json.dumps({"x": 1}))
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
