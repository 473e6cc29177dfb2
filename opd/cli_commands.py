"""Sub-commands beyond distill/demo/eval/recipes/bench: one row each, their code in their own
modules and imported only when the command runs (so `opd --help` stays fast).

A row is (name, help, "module:add_arguments", "module:run"); `add_arguments(parser)` declares
the options and `run(args) -> int` is the exit code. Commands whose positional arguments are
key=value overrides list their names in `OVERRIDE_COMMANDS`.
"""

from __future__ import annotations

import importlib

COMMANDS: list[tuple[str, str, str, str]] = [
    ("serve-teacher", "serve a teacher over HTTP",
     "opd.serve.args:add_serve_arguments", "opd.serve.server:serve_teacher"),
    ("cache-teacher", "precompute a teacher cache",
     "opd.cache_cli:add_cache_arguments", "opd.cache_cli:run_cache_teacher"),
    ("report", "render a run's diagnostics as PNG plots and an HTML page",
     "opd.report:add_report_arguments", "opd.report:run_report"),
    ("plan", "predict a run's step time, memory and staged budget split",
     "opd.plan_cli:add_plan_arguments", "opd.plan_cli:run_plan"),
]  # fmt: skip

OVERRIDE_COMMANDS: tuple[str, ...] = ("cache-teacher", "plan")


def resolve(ref: str):
    """The function named by "module:function"."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def add_commands(sub) -> None:
    for name, help_text, add_ref, _ in COMMANDS:
        resolve(add_ref)(sub.add_parser(name, help=help_text))


def run_command(args) -> int | None:
    """Run `args.command` if it is one of `COMMANDS`; None otherwise."""
    for name, _, _, run_ref in COMMANDS:
        if args.command == name:
            return resolve(run_ref)(args)
    return None
