"""The `opd` command line: `opd distill | demo | recipes | eval | bench` (docs/cli.md).

Configuration is `key=value` overrides on top of an optional `--config FILE.yaml`
(see `opd distill --help-config`), given before, between or after the flags. User errors
(bad config, data or paths, bad usage) print one `opd: error:` line on stderr and exit with
code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from opd.cli_commands import OVERRIDE_COMMANDS, add_commands, run_command
from opd.errors import OpdError

DEMO_DEFAULTS = [
    "model.teacher=embedded",
    "model.student_layers=15",
    "data.train=task:arithmetic",
    "data.eval=task:arithmetic:test",
    "data.eval_count=32",
    "method.recipe=on_policy_rkl",
    "train.steps=30",
    "train.batch_size=8",
    "train.lr=5e-5",
    "sampling.max_new_tokens=32",
]


class _Parser(argparse.ArgumentParser):
    """argparse with opd's error: one `opd: error: ...` line pointing at --help, exit code 2."""

    def error(self, message):
        command = self.prog.removeprefix("opd").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"opd: error: {where}{message} (see `{self.prog} --help`)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("opd")
    except PackageNotFoundError:  # running from a source tree that is not installed
        from opd import __version__

        return __version__


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# Commands whose positional arguments are key=value overrides, accepted between flags too.
_OVERRIDE_COMMANDS = ("distill", "eval", "demo", *OVERRIDE_COMMANDS)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="opd", description="On-policy distillation for language models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    p.add_argument("--version", action="version", version=f"opd {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("distill", help="distill a student from a teacher")
    d.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides (e.g. train.lr=1e-4 or lr=1e-4), before or after flags",
    )
    d.add_argument("--config", help="a YAML config file")
    d.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    d.add_argument(
        "--skip-bad-rows", action="store_true", help="skip and count malformed data rows"
    )
    d.add_argument(
        "--stop-after",
        type=_positive_int,
        metavar="STEP",
        help="stop after this step (a checkpoint is written)",
    )
    d.add_argument("--help-config", action="store_true", help="list every config key and exit")
    d.add_argument("--no-report", action="store_true", help="skip the before/after accuracy table")

    m = sub.add_parser("demo", help="distill the embedded SmolLM2-135M-Instruct into a pruned copy")
    m.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo")

    r = sub.add_parser("recipes", help="list the recipes, or show one")
    r.add_argument("name", nargs="?")

    b = sub.add_parser(
        "bench",
        help="benchmarks: `opd bench quality ...` (on- vs off-policy), `opd bench speed ...` "
        "(vs TRL) or `opd bench scaling ...` (the scaling-law fit)",
        description="Benchmarks. `opd bench quality|speed|scaling --help` lists each "
        "benchmark's options.",
    )
    b.add_argument("which", choices=["quality", "speed", "scaling"])
    b.add_argument(
        "rest", nargs=argparse.REMAINDER, help="options of that benchmark (--help lists them)"
    )

    e = sub.add_parser(
        "eval",
        help="held-out KL and accuracy of a finished run's student (or any student/teacher)",
        description="`opd eval RUN_DIR` evaluates RUN_DIR/student against the run's teacher on "
        "its held-out prompts and writes RUN_DIR/eval.md and eval.json; without RUN_DIR, set "
        "model.student=DIR (and model.teacher, data.eval) and the table is printed.",
    )
    e.add_argument(
        "overrides",
        nargs="*",
        metavar="[RUN_DIR] key=value",
        help="a run folder and/or overrides, e.g. model.student=DIR data.eval=FILE",
    )
    e.add_argument("--config", help="a YAML config file (not with RUN_DIR)")
    add_commands(sub)  # opd.cli_commands: serve-teacher, cache-teacher, ...
    p.set_defaults(_commands=sub.choices)
    return p


def parse_args(argv: list[str] | None):
    """Parse the command line; overrides may come before, between or after flags."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    parser = args._commands.get(args.command, parser)  # errors name the command
    if extra and args.command in _OVERRIDE_COMMANDS:
        bad = [x for x in extra if x.startswith("-")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def cmd_recipes(name: str | None) -> int:
    import textwrap

    from opd.recipes import RECIPES, get_recipe

    if name is None:
        print(f"{'recipe':<16} {'signal':<24} {'access':<10} {'granularity':<11} summary")
        for n in sorted(RECIPES):
            r = RECIPES[n]
            print(f"{n:<16} {r.signal:<24} {r.access:<10} {r.granularity:<11} {r.summary}")
        print("\n`opd recipes NAME` shows one recipe's composition and defaults.")
        return 0
    r = get_recipe(name)
    print(f"{r.name}: {r.summary}")
    print(f"citation:    {r.citation}")
    print(f"taxonomy:    signal={r.signal}, access={r.access}, granularity={r.granularity}")
    args = ", ".join(f"{k}={v!r}" for k, v in r.defaults().items()) or "none"
    print(f"arguments:   {args}   (set with method.args.NAME=VALUE)")
    print("composition with defaults:")
    print("  " + r.build().describe().replace("\n", "\n  "))
    print("deviations from the paper:")
    for item in r.deviations.splitlines() or ["none stated"]:
        print(
            textwrap.fill(
                item.removeprefix("- "), 96, initial_indent="  - ", subsequent_indent="    "
            )
        )
    return 0


def run_distill(cfg, *, resume=False, stop_after=None, report=True, title="opd distill") -> int:
    """Distill, then print and save the before/after table (teacher, student before/after).

    The student's numbers come from the loop's own held-out evaluations at step 0 and at the
    end (KL and accuracy from one greedy pass each); only the teacher is generated here.
    """
    from opd.evaluate import EvalTable, teacher_row
    from opd.logs import read_metrics
    from opd.train import RunInterrupted, distill

    t0 = time.perf_counter()
    try:  # distill builds the models from cfg (after checking the output folder)
        result = distill(cfg, resume=resume, stop_after=stop_after)
    except RunInterrupted as stop:  # SIGINT/SIGTERM: a checkpoint was written
        print(f"opd: {stop}", file=sys.stderr)
        return stop.exit_code
    models = result.models
    stopped_early = stop_after is not None and stop_after < cfg.train.steps
    if result.already_finished or not report or stopped_early or not result.is_main:
        return 0
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r.get("event") == "eval"]
    first = evals[0] if evals and evals[0]["step"] == 0 else {}
    last = evals[-1] if evals and evals[-1]["step"] == cfg.train.steps else {}
    from opd.report import diag_json, diag_markdown  # the diagnostics section (opd.diagnostics)

    teacher = teacher_row(models, result.data, cfg)
    table = EvalTable(
        [
            ("teacher", None, teacher["accuracy"]),
            ("student before", first.get("heldout_kl"), first.get("heldout_accuracy")),
            ("student after", last.get("heldout_kl"), last.get("heldout_accuracy")),
        ]
    )
    minutes = (time.perf_counter() - t0) / 60
    print("\n" + table.render())
    kl_before, kl_after = first.get("heldout_kl"), last.get("heldout_kl")
    if kl_before and kl_after is not None:
        print(
            f"held-out KL ratio after/before: {kl_after / kl_before:.3f}; wall time {minutes:.1f} min"
        )
    report_md = (
        f"# {title}\n\nrecipe `{cfg.method.recipe}`, {cfg.train.steps} steps, "
        f"batch {cfg.train.batch_size}, wall time {minutes:.1f} min\n\n{table.to_markdown()}\n"
    )
    (result.run_dir / "report.md").write_text(report_md + diag_markdown(evals))
    summary = {
        "kl_before": kl_before,
        "kl_after": kl_after,
        "accuracy": {
            "teacher": teacher["accuracy"],
            "student_before": first.get("heldout_accuracy"),
            "student_after": last.get("heldout_accuracy"),
        },
        "teacher_samples": teacher["samples"],
        "minutes": minutes,
    }
    (result.run_dir / "report.json").write_text(json.dumps(diag_json(summary, evals), indent=2))
    print(f"report: {result.run_dir / 'report.md'}")
    return 0


def _eval_target(args):
    """(cfg, run_dir or None) for `opd eval [RUN_DIR] overrides`."""
    from opd.config import load_config, load_run_config, parse_override

    overrides = list(args.overrides)
    if not overrides or "=" in overrides[0]:
        return load_config(args.config, overrides), None
    run_dir = Path(overrides.pop(0))
    if args.config:
        raise OpdError("opd eval: give RUN_DIR or --config, not both")
    cfg = load_run_config(run_dir, overrides, resume=False)
    if not any(parse_override(o)[0] in ("model.student", "student") for o in overrides):
        student = run_dir / "student"
        if not student.is_dir():
            raise OpdError(
                f"opd eval: '{student}' does not exist (the run has not finished); "
                "resume it with `opd distill --resume` or set model.student=DIR"
            )
        cfg.model.student = str(student)
    return cfg, run_dir


def cmd_eval(args) -> int:
    from opd.build import build_data, build_models
    from opd.config_io import atomic_write_text
    from opd.crosstok.evaluate import print_eval as crosstok_eval
    from opd.evaluate import EvalTable, heldout_kl

    cfg, run_dir = _eval_target(args)
    if not cfg.model.student:
        raise OpdError("opd eval: give a RUN_DIR or set model.student=PATH (a HF folder or .gguf)")
    models = build_models(cfg)
    data = build_data(cfg, models.tokenizer, need_train=False)
    if not data.eval:
        raise OpdError("opd eval: no held-out prompts; set data.eval=FILE")
    if getattr(models, "teacher_tokenizer", None) is not None:  # [crosstok] no shared vocabulary
        return crosstok_eval(models, data, cfg)
    res = heldout_kl(
        models.student,
        models.teacher,
        data.eval,
        pad_id=models.pad_id,
        stop_ids=models.stop_ids,
        vocab_size=models.vocab_size,
        max_new_tokens=cfg.sampling.max_new_tokens,
        tokenizer=models.tokenizer,
        verify=data.task.verify if data.task is not None else None,
    )
    from opd.evaluate import teacher_row

    teacher = teacher_row(models, data, cfg)
    table = EvalTable(
        [("teacher", None, teacher["accuracy"]), ("student", res["kl"], res["accuracy"])]
    )
    print(table.render())
    if run_dir is not None:
        sources = (
            f"student `{cfg.model.student}`, teacher `{cfg.model.teacher}`, "
            f"{len(data.eval)} held-out prompts from `{cfg.data.eval or cfg.data.train}`"
        )
        atomic_write_text(
            run_dir / "eval.md", f"# opd eval\n\n{sources}\n\n{table.to_markdown()}\n"
        )
        summary = {
            "student": cfg.model.student,
            "teacher": cfg.model.teacher,
            "eval_data": cfg.data.eval or cfg.data.train,
            "eval_prompts": len(data.eval),
            "kl": res["kl"],
            "student_accuracy": res["accuracy"],
            "teacher_accuracy": teacher["accuracy"],
            "tokens": res.get("tokens"),
            "mean_length": res.get("mean_length"),
        }
        atomic_write_text(run_dir / "eval.json", json.dumps(summary, indent=2) + "\n")
        print(f"eval: {run_dir / 'eval.md'}")
    return 0


def _quiet_libraries() -> None:
    """No hub access, no library progress bars or advisory warnings on our stderr."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _quiet_libraries()  # imports transformers: a Ctrl-C here is an interruption too
        return _dispatch(args)
    except OpdError as err:
        if args.debug:
            raise
        print(f"opd: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("opd: interrupted", file=sys.stderr)
        return 130


def _check_recipe(cfg) -> None:
    """An unknown recipe fails here, before any model is loaded or anything is written."""
    from opd.recipes import get_recipe  # imports torch: only once the config is valid

    get_recipe(cfg.method.recipe)


def _dispatch(args) -> int:
    from opd.config import config_help, load_config, load_run_config, unique_run_dir

    if args.command == "recipes":
        return cmd_recipes(args.name)
    if args.command == "eval":
        return cmd_eval(args)
    code = run_command(args)
    if code is not None:
        return code
    if args.command == "bench":
        from opd.bench.__main__ import main as bench_main  # the table of the benchmarks

        return bench_main([args.which, *args.rest])
    if args.command == "demo":
        cfg = load_config(None, [*DEMO_DEFAULTS, *args.overrides])
        _check_recipe(cfg)
        if not cfg.output_dir:
            cfg.output_dir = str(unique_run_dir("demo"))
        return run_distill(cfg, title="opd demo: SmolLM2-135M-Instruct → pruned student")
    if args.help_config:
        print(config_help())
        return 0
    if args.resume:
        if args.config:
            raise OpdError("--resume takes the run's own config.yaml; do not pass --config")
        cfg = load_run_config(args.resume, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    if args.skip_bad_rows:
        cfg.data.skip_bad_rows = True
    _check_recipe(cfg)
    return run_distill(
        cfg, resume=bool(args.resume), stop_after=args.stop_after, report=not args.no_report
    )


if __name__ == "__main__":
    sys.exit(main())
