"""`cai <stage> CONFIG [key.path=value ...]` and friends.

Every user error becomes one line on stderr and a non-zero exit (2); a labeler budget reached stops
cleanly with exit 3, everything received so far kept.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from cai.errors import CaiError

STAGE_HELP = {
    "sl": "SL-CAI: first answers, critiques and revisions -> sl/records.jsonl, sl/dataset/",
    "sft": "fine-tune the policy on the SL-CAI dataset -> sft/",
    "prefs": "sample answer pairs, AI preference labels -> prefs/records.jsonl, prefs/dataset/",
    "rm": "train the reward model on the soft labels -> rm/",
    "rl": "PPO (or DPO/GRPO/RLOO) against the AI-feedback reward -> rl/",
    "eval": "win rates, harmlessness, over-refusal, report -> eval/",
}


def available_stages() -> list[str]:
    from cai.stages import STAGES

    return [s for s in STAGES if importlib.util.find_spec(f"cai.stages.{s}") is not None]


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass


def run_stage(name: str, cfg):
    # rl's dpo/grpo/rloo are TRL's trainers, a module of their own (stages import nothing from each other).
    module_name = "rl_trl" if name == "rl" and cfg.rl.algorithm != "ppo" else name
    module = importlib.import_module(f"cai.stages.{module_name}")
    return module.run(cfg)


def cmd_stage(args) -> int:
    from cai.config import load_config

    cfg = load_config(args.config, args.overrides)
    _quiet_libraries()
    run_stage(args.stage, cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # One process of several (accelerate launch): its work is on disk and the process group is gone,
        # but interpreter teardown can still hang joining a gloo thread (seen after 2-process PPO under
        # DDP and FSDP on CPU, now and then). Leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def run_with_upstream(name: str, cfg, rerun: set[str] | None = None):
    """Run a stage; when an upstream stage it reads was made under another config, rerun that one
    first (and, the same way, whatever it reads), then this one."""
    from cai.stages import StaleStage

    rerun = set() if rerun is None else rerun
    while True:
        try:
            return run_stage(name, cfg)
        except StaleStage as err:
            if err.stage in rerun:
                raise
            rerun.add(err.stage)
            print(f"[run] {name} needs {err.stage}, which was made under another config: rerunning {err.stage} first")
            run_with_upstream(err.stage, cfg, rerun)


def cmd_run(args) -> int:
    from cai.config import load_config
    from cai.stages import stage_dir

    cfg = load_config(args.config, args.overrides)
    _quiet_libraries()
    stages = available_stages()
    for flag in (args.from_stage, args.only):
        if flag and flag not in stages:
            raise CaiError(f"unknown stage {flag!r}; stages: {', '.join(stages)}")
    if args.only:
        stages = [args.only]
    elif args.from_stage:
        stages = stages[stages.index(args.from_stage) :]
    import json
    import time

    started = time.time()
    for name in stages:
        run_with_upstream(name, cfg)
    minutes, seconds = divmod(int(time.time() - started), 60)
    print(f"\nPipeline finished in {minutes}m{seconds:02d}s. Outputs:")
    for name in stages:
        print(f"  {name:6s} {stage_dir(cfg, name)}")
    eval_dir = stage_dir(cfg, "eval")
    if "eval" in stages and (eval_dir / "metrics.json").is_file():
        from cai.report import headlines

        print(f"\nReport: {eval_dir / 'report.html'}  (Markdown: {eval_dir / 'report.md'})")
        for line in headlines(json.loads((eval_dir / "metrics.json").read_text())):
            print(f"  {line}")
    return 0


def cmd_constitution(args) -> int:
    from cai.constitution import check_files, format_constitution, load_constitution

    if args.action == "check":
        errors = check_files(args.files)
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        if not errors:
            print(f"ok: {len(args.files)} constitution file(s) valid")
        return 1 if errors else 0
    for path in args.files:
        print(format_constitution(load_constitution(path)))
    return 0


def cmd_audit_labeler(args) -> int:
    from cai.audit import run_audit
    from cai.config import load_config

    cfg = load_config(args.config, args.overrides)
    _quiet_libraries()
    run_audit(cfg, gold=args.gold, limit=args.limit, principles=args.principles, out=args.out)
    return 0


def cmd_cache(args) -> int:
    import json

    from cai.config import load_config
    from cai.labelers.cache import cache_clear, cache_stats, default_cache_path

    path = default_cache_path(load_config(args.config, args.overrides))
    if args.action == "stats":
        print(json.dumps(cache_stats(path), indent=2))
    else:
        removed = cache_clear(path, model=args.model)
        print(f"removed {removed} cached answer(s){f' of {args.model}' if args.model else ''} from {path}")
    return 0


def cmd_serve(args) -> int:
    from cai.config import load_config
    from cai.serve import serve

    cfg = load_config(args.config, args.overrides)
    _quiet_libraries()
    serve(cfg)


def cmd_stress(args) -> int:
    from cai.stress import run_stress

    _quiet_libraries()
    return run_stress(args)


def cmd_batches(args) -> int:
    import datetime

    from cai.config import load_config
    from cai.labelers.batch import open_batches

    cfg = load_config(args.config, args.overrides)
    batches = [b for b in open_batches(cfg.output_dir) if args.all or b["open"]]
    if not batches:
        print(f"no {'' if args.all else 'open '}labeler batches under {cfg.output_dir}")
    for b in batches:
        created = datetime.datetime.fromtimestamp(b["created"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        print(f"{b['stage']:6s} {b['backend']:9s} {b['id']}  {b['status']:12s} {b['requests']:6d} requests  "
              f"submitted {created}")
    return 0


def cmd_redteam(args) -> int:
    from cai.config import load_config
    from cai.stages import redteam

    cfg = load_config(args.config, args.overrides)
    _quiet_libraries()
    redteam.run(cfg)
    return 0


def cmd_config_keys(args) -> int:
    from cai.config import config_keys

    for key, help_text, default in config_keys():
        print(f"{key:34s} {help_text} [default: {default!r}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cai",
        description="Constitutional AI / RLAIF: a constitution and an AI critic, from SL-CAI to RL.",
        epilog="Overrides are dotted config keys, e.g. `cai sl configs/quickstart.yaml sl.rounds=2 "
        "labeler.backend=openai labeler.model=gpt-4o-mini`. `cai config-keys` lists every key.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in available_stages():
        p = sub.add_parser(name, help=STAGE_HELP[name], description=STAGE_HELP[name])
        p.add_argument("config", help="YAML run config (see configs/)")
        p.add_argument("overrides", nargs="*", help="key.path=value overrides")
        p.set_defaults(func=cmd_stage, stage=name)

    p = sub.add_parser(
        "run",
        help="run the stages in order, skipping finished ones, resuming a partial one, rerunning one made under another config",
    )
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--from", dest="from_stage", metavar="STAGE", help="start at this stage")
    group.add_argument("--only", metavar="STAGE", help="run only this stage")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("constitution", help="check or show constitution files")
    p.add_argument("action", choices=["check", "show"])
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_constitution)

    p = sub.add_parser(
        "audit-labeler",
        help="measure the labeler on gold comparisons: accuracy, position flips, length bias, calibration",
        description="Judge gold binary comparisons as the prefs stage judges pairs (same template, principles, "
        "both orders, soft labels) and score the labels: accuracy, position-flip rate, length bias, calibration.",
    )
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--gold", metavar="FILE", help="gold comparisons (JSONL); default: the 438 HHH comparisons of Bai et al. 2022")
    p.add_argument("--limit", type=int, metavar="N", help="judge a seeded sample of N gold pairs")
    p.add_argument(
        "--principles", choices=["constitution", "gold"], default="constitution",
        help="ask the constitution's comparison principles as the prefs stage does (default), or the gold file's own question",
    )
    p.add_argument("--out", metavar="DIR", help="folder for labeler_audit.json/.md (default: OUTPUT_DIR/audit)")
    p.set_defaults(func=cmd_audit_labeler)

    p = sub.add_parser("cache", help="labeler answer cache: stats, or clear (all, or one model's answers)")
    p.add_argument("action", choices=["stats", "clear"])
    p.add_argument("config", nargs="?", help="run config whose cache_dir to use (default: ~/.cache/cai)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--model", help="clear only this model's answers")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser(
        "serve",
        help="the constitutional judge as an HTTP reward service (OpenRLHF /get_reward, cai /v1/score)",
        description="Serve the run's constitution and labeler as a reward: pointwise 0-9 ratings, pairwise "
        "P(better than a reference), or group-wise debiased win rates (serve.mode). Binds serve.host:serve.port "
        "(127.0.0.1:8000); a bearer token from $CAI_SERVE_TOKEN is required when set, and to bind any other "
        "address. See docs/serve.md.",
    )
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. serve.mode=group serve.port=8001")
    p.set_defaults(func=cmd_serve)

    from cai.stress import add_arguments as stress_arguments

    p = sub.add_parser(
        "stress",
        help="put known reward hacks (apologies, keyword stuffing, ':', chat markup, notes to the judge...) to the "
        "run's judges beside good answers; --fail-on for CI",
        description="Every probe of a library of adversarial answers (cai/data/stress_probes.yaml, plus --probes FILE) "
        "beside a good answer to the same prompt, put to each judge: the checks, the eval judge, the reward model, the "
        "choice labeler (pairwise in both orders, and its 0-9 rating) and a running `cai serve`. Prints a table, writes "
        "OUTPUT_DIR/stress/stress.json and .md (shown in the eval report); --fail-on MARGIN exits 1 when a probe's win "
        "rate against the good answer exceeds 0.5 + MARGIN.",
    )
    stress_arguments(p)
    p.set_defaults(func=cmd_stress)

    p = sub.add_parser("batches", help="list the labeler batches (labeler.batch_api) a run has open")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--all", action="store_true", help="also the batches that have ended")
    p.set_defaults(func=cmd_batches)

    p = sub.add_parser(
        "redteam",
        help="write red-team prompts for each principle of the constitution, in each attack style -> redteam/prompts.jsonl",
        description="The labeler writes prompts that probe each principle of the constitution in each attack style "
        "(cai/data/attack_styles.yaml, redteam.styles_file); an archive over principle x style keeps the novel ones "
        "(no near-duplicates) that make the target policy fail the principle most, over redteam.rounds rounds of "
        "mutation. Writes OUTPUT_DIR/redteam/prompts.jsonl (for data.red_team, eval.prompts and cai stress), a held-out "
        "split train.jsonl / eval.jsonl, dataset/ and summary.json. Not a stage of `cai run`: name its file in data.red_team. "
        "See docs/redteam.md.",
    )
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. redteam.rounds=2 redteam.target=null")
    p.set_defaults(func=cmd_redteam)

    p = sub.add_parser("config-keys", help="list every config key with its help text and default")
    p.set_defaults(func=cmd_config_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cai.labelers.base import BudgetExceeded

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CaiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BudgetExceeded as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
