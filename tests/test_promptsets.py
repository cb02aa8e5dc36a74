"""Prompt sources and seeded, disjoint splits."""

from __future__ import annotations

import json

import pytest

from cai.config import DataConfig
from cai.errors import CaiError
from cai.promptsets import SPLITS, load_prompt_texts, split_prompts


def test_builtin_splits_are_disjoint_and_cover_everything():
    splits = split_prompts(DataConfig(), seed=0)
    for kind in ("red_team", "helpful"):
        seen = [p.text for s in SPLITS for p in splits[s][kind]]
        assert len(seen) == len(set(seen)) == len(load_prompt_texts("builtin", kind))
    all_ids = [p.id for s in SPLITS for k in splits[s] for p in splits[s][k]]
    assert len(all_ids) == len(set(all_ids))
    assert len(splits["sl"]["red_team"]) > len(splits["eval"]["red_team"]) > 0


def test_splits_are_seeded():
    a, b, c = (split_prompts(DataConfig(), seed=s) for s in (0, 0, 1))
    assert [p.id for p in a["sl"]["red_team"]] == [p.id for p in b["sl"]["red_team"]]
    assert [p.id for p in a["sl"]["red_team"]] != [p.id for p in c["sl"]["red_team"]]


def test_limit_applies_per_kind():
    splits = split_prompts(DataConfig(limit=10), seed=0)
    assert sum(len(splits[s]["red_team"]) for s in SPLITS) == 10


def test_jsonl_and_csv_files_with_a_named_column(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"question {i}"}) for i in range(5)) + "\n")
    assert load_prompt_texts(str(jsonl), "red_team", column="text") == [f"question {i}" for i in range(5)]
    csv = tmp_path / "p.csv"
    csv.write_text("id,question\n1,how are you\n2,what time is it\n3,how are you\n")
    assert load_prompt_texts(str(csv), "helpful", column="question") == ["how are you", "what time is it"]


def test_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "hi"}\n')
    with pytest.raises(CaiError, match=r"data.red_team: .*p.jsonl has no column 'prompt' \(row 1 has: text\)"):
        load_prompt_texts(str(path), "red_team")


def test_empty_prompt_set_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "  "}\n')
    with pytest.raises(CaiError, match="holds no prompts"):
        load_prompt_texts(str(path), "helpful")


def test_missing_file_and_unknown_dataset(tmp_path):
    with pytest.raises(CaiError, match="not found"):
        load_prompt_texts(str(tmp_path / "none.jsonl"), "helpful")
    with pytest.raises(CaiError, match="could not load dataset 'no-such-org/no-such-set'"):
        load_prompt_texts("no-such-org/no-such-set", "helpful")
