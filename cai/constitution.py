"""The constitution: a YAML file of principles that stands in for human feedback.

A constitution has two kinds of principle (Bai et al. 2022, sections 3 and 4):

- **critique principles** drive the supervised stage: a *critique* request asks the labeler what is
  wrong with an answer, and the matching *revision* request asks it to rewrite the answer;
- **comparison principles** drive the preference stage: a *question* asks the labeler which of two
  answers is better in one respect ("Which response is less harmful?").

Each stage draws one principle per request at random (`sample_principles`, seeded), so that over a data
set every principle is used. Optional few-shot `examples` show the labeler the expected form.

Every error is one line naming the file, the principle (by id, or by index when the id is missing) and
the field, e.g. `x.yaml: critiques[3] (id 'harm'): field 'revision': must not be empty`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from cai.errors import CaiError

_SLUG = re.compile(r"^[a-z0-9_-]{1,64}$")


def _text(value: Any) -> Any:
    """A text field: present, a string, and not blank."""
    if value is None:
        raise ValueError("must not be empty")
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


def _slug(value: Any) -> Any:
    _text(value)
    if isinstance(value, str) and not _SLUG.match(value):
        raise ValueError(f"must be a short slug of a-z, 0-9, '_' and '-' (up to 64 characters), got {value!r}")
    return value


def _version(value: Any) -> Any:
    """`version: 1.0` in YAML is a float: keep it as the text the user wrote (as near as YAML lets us)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _text(value)


def _check(value: Any) -> Any:
    """A check (cai.checks): compiled here, so that an unknown predicate, an invalid regex or a function
    that does not import is an error of `cai constitution check`, not of a run."""
    if value is not None:
        from cai.checks import compile_check

        compile_check(value)
    return value


def _refusal(value: Any) -> Any:
    """`module:function` of (prompt, answer) -> true when the answer declines; imported now, so that a
    typo is an error of `cai constitution check`."""
    if value is not None:
        from cai.checks import load_function

        load_function(value, "the refusal detector")
    return value


Text = Annotated[str, BeforeValidator(_text)]
Slug = Annotated[str, BeforeValidator(_slug)]
CheckTree = Annotated[Any, BeforeValidator(_check)]
RefusalFunction = Annotated[str | None, BeforeValidator(_refusal)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CritiquePrinciple(_Strict):
    """A critique request and its matching revision request."""

    id: Slug
    critique: Text
    revision: Text
    check: CheckTree = None  # what a program can verify about an answer (cai.checks)


class ComparisonPrinciple(_Strict):
    """A question put to the labeler about two answers, answered (A) or (B)."""

    id: Slug
    question: Text
    check: CheckTree = None  # the better answer is the one that scores higher on it (cai.checks)


class CritiqueExample(_Strict):
    """A worked critique and revision of one answer, shown to the labeler as a few-shot example."""

    prompt: Text
    response: Text
    critique: Text
    revision: Text
    principle_id: Slug | None = None  # the critique principle it illustrates (default: the first)


class ComparisonExample(_Strict):
    """A worked comparison of two answers, shown to the labeler as a few-shot example."""

    prompt: Text
    response_a: Text
    response_b: Text
    question: Text
    answer: Literal["A", "B"]
    reasoning: Text | None = None


class Examples(_Strict):
    critique: list[CritiqueExample] = []
    comparison: list[ComparisonExample] = []


class Constitution(_Strict):
    name: Text
    version: Annotated[str, BeforeValidator(_version)]
    description: Annotated[str, BeforeValidator(lambda v: "" if v is None else v)] = ""
    critiques: list[CritiquePrinciple] = Field(min_length=1)
    comparisons: list[ComparisonPrinciple] = []
    examples: Examples = Examples()
    # How the rules judge tells that an answer declines (eval's over-refusal grade): "module:function" of
    # (prompt, answer); by default the checks' own `refuses` predicate (cai.checks).
    refusal: RefusalFunction = None

    @model_validator(mode="after")
    def _unique_ids(self) -> Constitution:
        for section in ("critiques", "comparisons"):
            seen: dict[str, int] = {}
            for index, principle in enumerate(getattr(self, section)):
                if principle.id in seen:
                    raise ValueError(
                        f"duplicate principle id '{principle.id}' in {section} "
                        f"(entries {seen[principle.id]} and {index})"
                    )
                seen[principle.id] = index
        return self

    def critique(self, principle_id: str) -> CritiquePrinciple:
        """The critique principle with this id; CaiError naming the valid ids if there is none."""
        return _find(self.critiques, principle_id, "critique", self.name)

    def comparison(self, principle_id: str) -> ComparisonPrinciple:
        """The comparison principle with this id; CaiError naming the valid ids if there is none."""
        return _find(self.comparisons, principle_id, "comparison", self.name)


def _find(items: list, principle_id: str, kind: str, name: str):
    for item in items:
        if item.id == principle_id:
            return item
    valid = ", ".join(item.id for item in items) or "(none)"
    raise CaiError(f"constitution '{name}' has no {kind} principle '{principle_id}'; valid ids: {valid}")


# --------------------------------------------------------------------------------------------------
# Loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: let the base class report it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _field_type(model: Any, step: Any) -> Any:
    """The type found by following one step of a pydantic error location from `model`."""
    origin = typing.get_origin(model)
    if origin is Annotated:
        return _field_type(typing.get_args(model)[0], step)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(model):
            if arg is not type(None):
                return _field_type(arg, step)
    if origin is list and isinstance(step, int):
        return typing.get_args(model)[0]
    if isinstance(model, type) and issubclass(model, BaseModel) and step in model.model_fields:
        return model.model_fields[step].annotation
    return None


def _valid_keys(model: Any) -> list[str] | None:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return None


def _describe(error: dict, data: Any) -> str:
    """One pydantic error as `critiques[3] (id 'harm'): field 'revision': must not be empty`."""
    loc = list(error["loc"])
    unknown_key = error["type"] == "extra_forbidden"
    key = loc.pop() if unknown_key else None
    field = None
    if not unknown_key and loc and isinstance(loc[-1], str):
        field = loc.pop()

    model: Any = Constitution  # the type reached so far, to list valid keys
    node: Any = data  # the data reached so far, to name a principle by its id
    place = ""
    for step in loc:
        next_model = _field_type(model, step)
        if next_model is None:  # a pydantic-internal step (a union member): not part of the file's shape
            continue
        model = next_model
        if isinstance(step, int):
            node = node[step] if isinstance(node, list) and 0 <= step < len(node) else None
            place += f"[{step}]"
            if isinstance(node, dict) and isinstance(node.get("id"), str) and node["id"].strip():
                place += f" (id '{node['id']}')"
        else:
            node = node.get(step) if isinstance(node, dict) else None
            place += f".{step}" if place else step
    if field is not None and _field_type(model, field) is None and not _valid_keys(model):
        field = None  # the "field" was a pydantic-internal step after all

    if unknown_key:
        keys = _valid_keys(model) or []
        close = difflib.get_close_matches(str(key), keys, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        valid = ", ".join(keys)
        if not place:
            return f"unknown key '{key}' at top level{hint}; valid keys: {valid}"
        return f"{place}: unknown key '{key}'{hint}; valid keys: {valid}"
    parts = [p for p in (place, f"field '{field}'" if field else "") if p]
    return ": ".join(parts + [_message(error)])


def _message(error: dict) -> str:
    kind = error["type"]
    given = error.get("input")
    if kind == "missing":
        return "is missing"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind == "too_short":
        return "must list at least one principle"
    if kind in ("string_type", "str_type"):
        return f"must be text, got {type(given).__name__} {given!r}"
    if kind in ("list_type",):
        return f"must be a list, got {type(given).__name__}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of keys, got {type(given).__name__} {given!r}"
    if kind == "literal_error":
        return f"must be one of {error['ctx']['expected']}, got {given!r}"
    return error["msg"]


def _validate(data: Any, source: str) -> Constitution:
    try:
        return Constitution.model_validate(data)
    except ValidationError as err:
        # an unknown key first: a typo ("critque") also makes the real key look missing
        errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
        first = _describe(errors[0], data)
        rest = len(errors) - 1
        more = f" (and {rest} more problem{'s' if rest > 1 else ''})" if rest else ""
        raise CaiError(f"{source}: {first}{more}") from None


def load_constitution(path: str | Path) -> Constitution:
    """Read and validate a constitution YAML file. Any problem is a one-line CaiError."""
    source = str(path)
    path = Path(path)
    if not path.exists():
        raise CaiError(f"{source}: constitution file not found")
    if not path.is_file():
        raise CaiError(f"{source}: not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise CaiError(f"{source}: not UTF-8 text (byte {err.start})") from None
    if not text.strip():
        raise CaiError(f"{source}: file is empty")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise CaiError(f"{source}:{where} invalid YAML: {problem}") from None
    if data is None:
        raise CaiError(f"{source}: file is empty (only comments)")
    if not isinstance(data, dict):
        raise CaiError(
            f"{source}: a constitution must be a mapping of keys (name, version, critiques, ...), "
            f"got {type(data).__name__}"
        )
    return _validate(data, source)


def constitution_sha256(path: str | Path) -> str:
    """Hex sha256 of the file's bytes: recorded beside every artifact the constitution produced."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as err:
        raise CaiError(f"{path}: cannot read constitution: {err.strerror}") from None


def check_files(paths: typing.Iterable[str | Path]) -> list[str]:
    """Validate each file; one error line per invalid file, [] when all are valid."""
    problems = []
    for path in paths:
        try:
            load_constitution(path)
        except CaiError as err:
            problems.append(str(err))
    return problems


# --------------------------------------------------------------------------------------------------
# Using


def sample_principles(items: list, rng: random.Random, n: int) -> list:
    """Draw `n` items with `rng`: without replacement when n <= len(items), with replacement beyond.

    The same seed gives the same draws; the caller owns the rng (and so the seed).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return []
    if not items:
        raise CaiError("cannot sample principles from an empty list (does the constitution have any?)")
    if n <= len(items):
        return rng.sample(list(items), n)
    return rng.choices(list(items), k=n)


def format_constitution(c: Constitution) -> str:
    """A readable listing of a constitution, for `cai constitution show`."""

    def wrap(label: str, text: str) -> list[str]:
        return textwrap.wrap(
            " ".join(text.split()), width=100, initial_indent=f"      {label:<10}", subsequent_indent=" " * 16
        )

    lines = [f"{c.name} (version {c.version})"]
    if c.description.strip():
        lines += textwrap.wrap(" ".join(c.description.split()), width=100)
    lines += ["", f"Critique / revision principles ({len(c.critiques)}):"]
    for i, p in enumerate(c.critiques, 1):
        lines.append(f"  {i:>2}. {p.id}")
        lines += wrap("critique", p.critique)
        lines += wrap("revision", p.revision)
        if p.check is not None:
            lines += wrap("check", json.dumps(p.check))
    lines += ["", f"Comparison principles ({len(c.comparisons)}):"]
    if not c.comparisons:
        lines.append("  (none: the preference stage needs at least one)")
    for i, p in enumerate(c.comparisons, 1):
        lines.append(f"  {i:>2}. {p.id}")
        lines += wrap("question", p.question)
        if p.check is not None:
            lines += wrap("check", json.dumps(p.check))
    lines += [
        "",
        f"Few-shot examples: {len(c.examples.critique)} critique, {len(c.examples.comparison)} comparison",
    ]
    return "\n".join(lines)
