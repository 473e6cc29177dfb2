"""The `opd` command line: `opd distill | demo | recipes | eval`.

Configuration is `key=value` overrides on top of an optional `--config FILE.yaml`
(see `opd distill --help-config`). User errors (bad config, data or paths) print one line
on stderr and exit with code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opd", description="On-policy distillation for language models."
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", help="distill a student from a teacher")
    d.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. train.lr=1e-4)")
    d.add_argument("--config", help="a YAML config file")
    d.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    d.add_argument(
        "--skip-bad-rows", action="store_true", help="skip and count malformed data rows"
    )
    d.add_argument("--stop-after", type=int, help="stop after this step (a checkpoint is written)")
    d.add_argument("--help-config", action="store_true", help="list every config key and exit")
    d.add_argument("--no-report", action="store_true", help="skip the before/after accuracy table")

    m = sub.add_parser("demo", help="distill the embedded SmolLM2-135M-Instruct into a pruned copy")
    m.add_argument("overrides", nargs="*", help="key=value overrides of the demo's settings")

    r = sub.add_parser("recipes", help="list the recipes, or show one")
    r.add_argument("name", nargs="?")

    b = sub.add_parser(
        "bench",
        help="benchmarks: `opd bench quality ...` (on- vs off-policy) or `opd bench speed ...` (vs TRL)",
        add_help=False,
    )
    b.add_argument("which", choices=["quality", "speed"])
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (--help lists them)")

    e = sub.add_parser("eval", help="before/after table for a student/teacher pair")
    e.add_argument(
        "overrides", nargs="*", help="e.g. model.student=DIR model.teacher=embedded data.eval=FILE"
    )
    e.add_argument("--config", help="a YAML config file")
    return p


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


def teacher_row(models, data, cfg):
    """Answer accuracy of the teacher on the held-out prompts (one greedy pass)."""
    from opd.evaluate import task_accuracy

    verify = data.task.verify if data.task is not None else None
    return task_accuracy(
        models.teacher,
        models.tokenizer,
        data.eval,
        pad_id=models.pad_id,
        stop_ids=models.stop_ids,
        max_new_tokens=cfg.sampling.max_new_tokens,
        verify=verify,
    )


def run_distill(cfg, *, resume=False, stop_after=None, report=True, title="opd distill") -> int:
    """Distill, then print and save the before/after table (teacher, student before/after).

    The student's numbers come from the loop's own held-out evaluations at step 0 and at the
    end (KL and accuracy from one greedy pass each); only the teacher is generated here.
    """
    from opd.evaluate import EvalTable
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
    if result.already_finished or not report or stopped_early:
        return 0
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r.get("event") == "eval"]
    first = evals[0] if evals and evals[0]["step"] == 0 else {}
    last = evals[-1] if evals and evals[-1]["step"] == cfg.train.steps else {}
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
    (result.run_dir / "report.md").write_text(report_md)
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
    (result.run_dir / "report.json").write_text(json.dumps(summary, indent=2))
    print(f"report: {result.run_dir / 'report.md'}")
    return 0


def cmd_eval(args) -> int:
    from opd.build import build_data, build_models
    from opd.config import load_config
    from opd.evaluate import EvalTable, heldout_kl

    cfg = load_config(args.config, args.overrides)
    if not cfg.model.student:
        raise OpdError("opd eval: set model.student=PATH (a HF folder or .gguf file)")
    models = build_models(cfg)
    data = build_data(cfg, models.tokenizer, need_train=False)
    if not data.eval:
        raise OpdError("opd eval: no held-out prompts; set data.eval=FILE")
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
    teacher = teacher_row(models, data, cfg)
    table = EvalTable(
        [("teacher", None, teacher["accuracy"]), ("student", res["kl"], res["accuracy"])]
    )
    print(table.render())
    return 0


def _quiet_libraries() -> None:
    """No hub access, no library progress bars or advisory warnings on our stderr."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    try:
        return _dispatch(args)
    except OpdError as err:
        if args.debug:
            raise
        print(f"opd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("opd: interrupted", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from opd.config import config_help, load_config

    if args.command == "recipes":
        return cmd_recipes(args.name)
    if args.command == "eval":
        return cmd_eval(args)
    if args.command == "bench":
        from opd.bench import main_quality, main_speed

        return (main_quality if args.which == "quality" else main_speed)(args.rest)
    if args.command == "demo":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg = load_config(None, [*DEMO_DEFAULTS, f"output_dir=runs/demo-{stamp}", *args.overrides])
        return run_distill(cfg, title="opd demo: SmolLM2-135M-Instruct → pruned student")
    if args.help_config:
        print(config_help())
        return 0
    overrides = list(args.overrides)
    resume = False
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise OpdError(f"--resume: '{run_dir}' is not a run folder (no config.yaml)")
        cfg = load_config(run_dir / "config.yaml", overrides)
        cfg.output_dir = str(run_dir)
        resume = True
    else:
        cfg = load_config(args.config, overrides)
    if args.skip_bad_rows:
        cfg.data.skip_bad_rows = True
    return run_distill(cfg, resume=resume, stop_after=args.stop_after, report=not args.no_report)


if __name__ == "__main__":
    sys.exit(main())
