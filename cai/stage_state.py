"""Whether a stage folder is current: what each stage's output depends on, and the checks that read it.

The stages (cai/stages/) write their folders; what reads one — a later stage, `cai serve` picking the
SL-CAI model, the rl stage's reward model — asks here whether it was made under the current config,
so that nothing below the stages reaches up into them.

A stage's fingerprint is a hash of exactly what it (and every stage before it) used:

- the config sections it reads, less the keys that only change how fast or how far a run goes
  (batch sizes, concurrency, request caps: raising a cap resumes instead of rerunning);
- the choice labeler only where it judges: in sl only with `sl.verify_revisions`, from prefs on always;
- the constitution by content (its path is left out, so `./constitutions/x.yaml` and
  `constitutions/x.yaml` are the same run), and every prompt file by content (`data.red_team`,
  `data.helpful`, `eval.prompts`: editing one in place makes the stages that read it stale);
- the contents of every template the stage renders (sl's verifier renders compare.jinja, prefs in
  chain-of-thought mode compare_cot.jinja, the rl stage's direct reward score.jinja, ...).

A stage that reads an earlier stage's output (`require_done`) refuses one finished under another
config in one line naming the first key that differs, and `cai run` reruns it instead (StaleStage).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cai.config import Config, config_hash
from cai.constitution import constitution_sha256
from cai.errors import CaiError
from cai.records import DONE

STAGES = ("sl", "sft", "prefs", "rm", "rl", "eval")

# Config sections each stage reads (cumulatively: earlier stages' sections count too). The choice
# labeler is added to sl's only when sl verifies revisions with it (`_sections`).
STAGE_SECTIONS = {
    "sl": ("seed", "constitution", "policy", "labeler", "data", "sl"),
    "sft": ("sft",),
    "prefs": ("choice_labeler", "prefs"),
    "rm": ("rm",),
    "rl": ("rl",),
    "eval": ("eval",),
}
# Keys that change speed or limits, not results.
OPERATIONAL_KEYS = {
    "policy": {"batch_size", "base_url", "served_model", "concurrency", "api_key_env"},
    "labeler": {
        "batch_size", "concurrency", "requests_per_minute", "tokens_per_minute", "timeout",
        "max_tries", "max_requests", "max_cost", "prices", "cache",
        "server_concurrency", "server_failures", "server_bench_seconds",
        "batch_api", "batch_poll_seconds", "batch_discount",
    },
    "sft": {"activation_checkpointing"},
    "rm": {"activation_checkpointing"},
    "eval": {"served_models", "batch_size"},
}
OPERATIONAL_KEYS["choice_labeler"] = OPERATIONAL_KEYS["labeler"]
# Keys added after runs were made, left out of the fingerprint while they hold these values (what runs made before
# the key existed did), so those runs stay current.
LEFT_OUT_AT = {"rl": {"seed": None, "value_model": True}, "rm": {"min_label_margin": 0.0}}
# A folder under output_dir made by a command outside the pipeline's order (`cai redteam`, whose prompts
# a run reads only when data.* names them): the sections it reads, on its own.
STANDALONE_SECTIONS = {"redteam": ("seed", "constitution", "policy", "labeler", "choice_labeler", "redteam")}
FILE_PREFIX = "file sha256:"  # a prompt file in the fingerprint: its contents' hash, not its path


def stage_templates(cfg: Config, stage: str) -> list[str]:
    """The templates `stage` itself renders under `cfg` (not those of the stages before it)."""
    if stage == "sl":  # policy_input renders answer.jinja; the verifier asks compare.jinja
        return ["answer.jinja", "critique.jinja", "revision.jinja"] + (["compare.jinja"] if cfg.sl.verify_revisions else [])
    if stage == "prefs":
        return ["compare.jinja"] + (["compare_cot.jinja"] if cfg.prefs.chain_of_thought else [])
    if stage == "rl" and cfg.rl.reward == "direct":  # the labeler scores each answer with score.jinja
        return ["score.jinja"]
    if stage == "redteam":
        return ["redteam_write.jinja", "redteam_mutate.jinja", "answer.jinja", "compare.jinja"]
    if stage == "eval":
        return (["harmlessness.jinja"] if cfg.eval.harmlessness else []) + (["refusal.jinja"] if cfg.eval.refusal else [])
    return []


def _sections(cfg: Config, stage: str) -> tuple[str, ...]:
    sections = STAGE_SECTIONS.get(stage) or STANDALONE_SECTIONS[stage]
    if stage == "sl" and cfg.sl.verify_revisions:
        sections = (*sections[:4], "choice_labeler", *sections[4:])
    return sections


def file_digest(path: str) -> str | None:
    """FILE_PREFIX + the sha256 of a file's contents, or None when `path` names no file (a builtin set
    or a `datasets` name, kept as it is)."""
    file = Path(path).expanduser()
    if not file.is_file():
        return None
    return FILE_PREFIX + hashlib.sha256(file.read_bytes()).hexdigest()[:16]


def _prompt_files_by_content(section: str, value):
    if section == "data" and isinstance(value, dict):
        return {k: (file_digest(v) or v) if k in ("red_team", "helpful") and isinstance(v, str) else v for k, v in value.items()}
    if section == "eval" and isinstance(value, dict) and value.get("prompts"):
        files = []
        for entry in value["prompts"]:
            if isinstance(entry, dict):
                files.append({**entry, "file": file_digest(entry["file"]) or entry["file"]})
            else:
                files.append(file_digest(entry) or entry)
        return {**value, "prompts": files}
    if section == "prefs" and isinstance(value, dict):
        if not value.get("stress_pairs"):  # no probe is read: left out, so runs made before the keys existed stay current
            return {k: v for k, v in value.items() if k not in ("stress_pairs", "stress_probes")}
        from cai.stress import LIBRARY  # the probes written into the preference data, by content

        mine = value.get("stress_probes")
        return {**value, "stress_probes": [file_digest(str(LIBRARY)), mine and (file_digest(mine) or mine)]}
    return value


def fingerprint_parts(cfg: Config, stage: str) -> dict:
    """What a stage's output depends on: the config sections it and the stages before it read (less the
    operational keys, prompt files by content), the constitution's hash and the templates' hash."""
    from cai.templates import Templates

    dumped = cfg.model_dump(mode="json")
    parts: dict = {}
    templates: list[str] = []
    for name in STAGES[: STAGES.index(stage) + 1] if stage in STAGES else (stage,):
        for section in _sections(cfg, name):
            if section == "constitution":
                continue  # by content below: the same file under another path is the same run
            value = dumped.get(section)
            if isinstance(value, dict):
                left_out = LEFT_OUT_AT.get(section, {})
                value = {k: v for k, v in value.items()
                         if k not in OPERATIONAL_KEYS.get(section, ()) and not (k in left_out and v == left_out[k])}
                if section in ("labeler", "choice_labeler") and isinstance(value.get("base_url"), list):
                    value["base_url"] = "pool"  # adding or removing a server of a pool changes no answer
            parts[section] = _prompt_files_by_content(section, value)
        templates += [t for t in stage_templates(cfg, name) if t not in templates]
    parts["constitution_sha256"] = constitution_sha256(cfg.constitution)
    parts["templates"] = Templates(cfg.templates).fingerprint(sorted(templates))
    return parts


def stage_fingerprint(cfg: Config, stage: str) -> str:
    return config_hash(fingerprint_parts(cfg, stage))


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out: dict = {}
        for key, child in value.items():
            out.update(_flatten(child, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def differing_key(before: dict, now: dict) -> tuple[str, object, object] | None:
    """(dotted key, value before, value now) of the first key whose value differs, in config order."""
    old, new = _flatten(before), _flatten(now)
    for key in list(new) + [k for k in old if k not in new]:
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            return key, old.get(key, "<unset>"), new.get(key, "<unset>")
    return None


class StaleStage(CaiError):
    """An upstream stage finished under another config; `stage` names it so that `cai run` can rerun it."""

    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


def stage_dir(cfg: Config, stage: str) -> Path:
    return Path(cfg.output_dir).expanduser() / stage


def made_under(cfg: Config, stage: str) -> str | None:
    """None when `stage` is finished under this config; else why not, as a phrase."""
    path = stage_dir(cfg, stage)
    if not (path / DONE).exists():
        return "not finished"
    if (path / DONE).read_text().strip() == stage_fingerprint(cfg, stage):
        return None
    provenance = path / "provenance.json"
    before = json.loads(provenance.read_text()).get("fingerprint_parts") if provenance.is_file() else None
    found = differing_key(before, fingerprint_parts(cfg, stage)) if isinstance(before, dict) else None
    if found is None:
        return "made under another config (see its config.yaml)"
    key, old, new = found
    if key == "constitution_sha256":
        return "made with another constitution text"
    if key == "templates":
        return "made with other prompt templates"
    if any(isinstance(v, str) and v.startswith(FILE_PREFIX) for v in (old, new)):
        return f"made from other contents of the prompt file {key} (edited since)"
    return f"made with {key}={old!r} (now {new!r})"


def is_current(cfg: Config, stage: str) -> bool:
    """The stage is finished, under this config."""
    return made_under(cfg, stage) is None


def require_done(cfg: Config, stage: str, needed_by: str) -> Path:
    """The folder of an earlier stage finished under this config, or one line naming the stage that makes
    it (and, when it was made under another config, the first key that differs)."""
    path = stage_dir(cfg, stage)
    if not (path / DONE).exists():
        raise CaiError(f"{needed_by} needs the output of the {stage} stage ({path}); run `cai {stage} CONFIG` first")
    why = made_under(cfg, stage)
    if why is not None:
        raise StaleStage(
            f"{needed_by} needs the {stage} stage made under this config, but {path} was {why}; "
            f"rerun it with `cai {stage} CONFIG [overrides]`, or `cai run`, which reruns it",
            stage,
        )
    return path
