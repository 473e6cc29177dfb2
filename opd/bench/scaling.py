"""The scaling sweep: held-out KL(q_student ‖ p_teacher) and accuracy over student size × FLOPs.

One synthetic task (default `reverse`, the cheapest teacher), one cached task teacher
(`opd.tasks.teacher`), one on-policy recipe (default GKD λ = 0.5, β = 0.5: half the
completions sampled by the student, half from the dataset, generalized JSD), and students of
several widths at a fixed depth (default hidden 16 / 32 / 48 / 64 × 2 layers). Every size
gets the same compute budgets: C_max = `budget_gflop` (default: `steps` steps of the largest
student), and the cells are C_k = f_k · C_max for `budget_fractions` f_k. A student of size N
takes round(C_max / cost_N) steps, cost_N the estimated FLOPs of one step
(`opd.bench.flops`, as `opd bench quality` counts them: generation + teacher scoring +
student forward/backward).

Each cell's numbers come from `opd.bench.quality.run_method` / `evaluate_student` (the same
code as the quality benchmark): greedy exact-match accuracy on the teacher's held-out prompts
and the held-out token-mean KL(q_student ‖ p_teacher) on greedy student completions, with C
the FLOPs actually counted up to that point. The fit (`opd.bench.scaling_fit`) is
L = E + A·N^(−α) + B·C^(−β) on the KL, and the same law on the error rate 1 − accuracy.

Deviations: the budgets of one size are points of ONE run with one cosine schedule sized for
C_max (Kaplan et al. 2020 style), not separate runs annealed at each budget (Hoffmann et al.
2022), which would cost Σ f_k times as much (1.9× by default); the intermediate points are
not annealed, so their loss is overstated and the fitted β biased upward. With `warmup_steps` > 0 each student is first trained
with supervised KD (quality's warm-up) and those FLOPs are added to C. The student at
initialisation is saved as the run's start checkpoint when there is no warm-up. N counts
parameters without the input embedding (`flop_params`); `params_total` is reported beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from opd.bench import quality
from opd.bench.environment import machine
from opd.bench.flops import flop_params, microbatch_flops, writer_params
from opd.bench.methods import prefixes_of
from opd.bench.scaling_report import analyse, write_report
from opd.cli import _Parser as CliParser
from opd.errors import ConfigError, OpdError
from opd.tasks.teacher import TeacherPreset


def _f(default, doc: str, **meta):
    return field(default=default, metadata={"doc": doc, **meta})


@dataclass
class ScalingSettings:
    """Everything the scaling sweep depends on; each field is also a command-line option."""

    task: str = _f("reverse", "synthetic task")
    method: str = _f("gkd:lmbda=0.5,beta=0.5", "the on-policy recipe, 'recipe:arg=value,...'")
    hidden: tuple = _f((16, 32, 48, 64), "student widths (at least 4)", item=int)
    layers: int = _f(2, "student depth (every size)")
    heads: int = _f(2, "student attention heads (every size)")
    steps: int = _f(150, "steps of the largest student at the largest budget")
    budget_gflop: float = _f(None, "the largest budget in GFLOPs instead of --steps", type=float)
    budget_fractions: tuple = _f(
        (0.125, 0.25, 0.5, 1.0), "budgets as fractions of the largest", item=float
    )
    seeds: int = _f(1, "seeds per cell (student init, data order, sampling)")
    warmup_steps: int = _f(0, "supervised-KD steps before the recipe (their FLOPs count in C)")
    warmup_lr: float = _f(3e-3, "learning rate of the optional warm-up")
    lr: float = _f(3e-3, "peak learning rate (cosine to 10 %)")
    lr_warmup: int = _f(10, "linear lr ramp")
    batch_size: int = _f(32, "prompts per step")
    train_rows: int = _f(4000, "training prompt pool")
    eval_rows: int = _f(100, "held-out prompts for accuracy (≤ 200)")
    kl_rows: int = _f(48, "held-out prompts for the teacher KL")
    resamples: int = _f(200, "bootstrap resamples for the confidence intervals")
    teacher_seed: int = _f(0, "seed of the task teacher")
    cache_dir: str = _f(None, "task-teacher cache (default ~/.cache/opd)", type=str)
    workers: int = _f(1, "runs side by side, one process each")
    threads: int = _f(1, "torch threads per worker")
    progress: bool = _f(True, "progress bar", cli=False)
    teacher_preset: object = _f(None, "an opd.tasks.teacher.TeacherPreset (tests)", cli=False)


def _validate(s: ScalingSettings) -> None:
    if len(set(s.hidden)) < 4:
        raise ConfigError(
            f"--hidden: need at least 4 distinct student sizes for the fit, got {list(s.hidden)}"
        )
    bad = [h for h in s.hidden if h < s.heads or h % s.heads]
    if bad:
        raise ConfigError(
            f"--hidden: every width must be a multiple of --heads {s.heads}; not {bad}"
        )
    fr = sorted(set(s.budget_fractions))
    if len(fr) < 3 or fr[0] <= 0 or fr[-1] != 1.0:
        raise ConfigError(
            f"--budget-fractions: need at least 3 distinct values in (0, 1] "
            f"ending at 1, got {list(s.budget_fractions)}"
        )
    if s.seeds < 1 or s.steps < 1:
        raise ConfigError("--seeds and --steps must be >= 1")


def quality_settings(s: ScalingSettings, hidden: int) -> quality.Settings:
    """The quality benchmark's settings for one student width (its functions take these)."""
    return quality.Settings(
        task=s.task, seeds=s.seeds, methods=(s.method,), steps=s.steps,
        warmup_steps=s.warmup_steps, warmup_lr=s.warmup_lr, lr=s.lr, lr_warmup=s.lr_warmup,
        batch_size=s.batch_size, student_hidden=hidden, student_layers=s.layers,
        student_heads=s.heads, train_rows=s.train_rows, eval_rows=s.eval_rows,
        kl_rows=s.kl_rows, eval_points=tuple(sorted(set(s.budget_fractions))),
        teacher_seed=s.teacher_seed, cache_dir=s.cache_dir, workers=s.workers,
        threads=s.threads, progress=s.progress, teacher_preset=s.teacher_preset,
    )  # fmt: skip


def plan_sizes(s: ScalingSettings, setup) -> tuple[list[dict], float]:
    """Per width: parameters, estimated FLOPs of one step, steps at the largest budget."""
    rows = []
    for h in sorted(set(s.hidden)):
        qs = quality_settings(s, h)
        probe = quality._models(setup, qs, 0, None)
        n_s, n_t = flop_params(probe.student), flop_params(probe.teacher)
        cost = microbatch_flops(
            n_student=n_s,
            n_teacher=n_t,
            n_writer=writer_params(prefixes_of(s.method), n_s, n_t),
            prompt_tokens=s.batch_size * setup.prompt_tokens,
            completion_tokens=s.batch_size * setup.completion_tokens,
        )
        rows.append(
            {
                "hidden": h,
                "params": n_s,
                "teacher_params": n_t,
                "step_flops": cost,
                "params_total": sum(p.numel() for p in probe.student.parameters()),
            }
        )
    c_max = s.budget_gflop * 1e9 if s.budget_gflop else s.steps * rows[-1]["step_flops"]
    for r in rows:
        r["steps"] = max(len(s.budget_fractions), round(c_max / r["step_flops"]))
    return rows, c_max


def _size_setup(setup, out_dir: Path, hidden: int):
    return dataclasses.replace(setup, out_dir=str(out_dir / f"h{hidden}"))


def run_scaling(s: ScalingSettings, out_dir: Path, log=print) -> dict:
    """The whole grid; writes `scaling.json`, `results.md` and `scaling.png` into `out_dir`."""
    _validate(s)
    t0, started_on = time.perf_counter(), machine()
    quality._quiet()
    torch.set_num_threads(s.threads)
    setup = quality.prepare_task(quality_settings(s, s.hidden[0]), out_dir)
    log(
        f"[{s.task}] teacher: {setup.teacher_info.get('params')} params, held-out accuracy "
        f"{setup.teacher_info.get('accuracy')}"
    )
    sizes, c_max = plan_sizes(s, setup)
    for r in sizes:
        log(
            f"[{s.task}] hidden {r['hidden']}: N = {r['params']:,} (total {r['params_total']:,}), "
            f"{r['step_flops'] / 1e6:.1f} MFLOP/step, {r['steps']} steps"
        )
    bar = tqdm(
        total=s.seeds * sum(r["steps"] + s.warmup_steps for r in sizes),
        desc=f"scaling {s.task}",
        unit="step",
        disable=not s.progress,
        dynamic_ncols=True,
    )
    warm_flops = _starts(s, setup, out_dir, sizes, bar)
    jobs = [
        dict(
            s=quality_settings(s, r["hidden"]),
            setup=_size_setup(setup, out_dir, r["hidden"]),
            method=s.method,
            seed=seed,
            steps=r["steps"],
            lr=s.lr,
        )
        for r in sizes
        for seed in range(s.seeds)
    ]
    runs = quality.run_jobs(jobs, s.workers, bar)
    bar.close()
    cells = []
    for job, run in zip(jobs, runs):
        size = next(r for r in sizes if r["hidden"] == job["s"].student_hidden)
        offset = warm_flops.get((size["hidden"], run["seed"]), 0.0)
        for k, point in enumerate(run["curve"]):  # one point per budget fraction
            cells.append(
                {
                    "hidden": size["hidden"],
                    "params": size["params"],
                    "budget": k,
                    "gap": size["teacher_params"] / size["params"],
                    "seed": run["seed"],
                    "step": point["step"],
                    "flops": point["flops"] + offset,
                    "accuracy": point["accuracy"],
                    "teacher_kl": point["teacher_kl"],
                }
            )
        log(
            f"[{s.task}] hidden {size['hidden']} seed {run['seed']}: accuracy "
            f"{run['final']['accuracy']:.3f}, KL {run['final']['teacher_kl']:.4f}, "
            f"{run['seconds']:.0f} s"
        )
    settings = {k: v for k, v in dataclasses.asdict(s).items() if k != "teacher_preset"}
    result = {
        "task": s.task,
        "method": s.method,
        "settings": settings,
        "machine_at_start": started_on,
        "machine_at_end": machine(),
        "teacher": setup.teacher_info,
        "sizes": sizes,
        "budget_max_gflop": c_max / 1e9,
        "budget_gflop": [f * c_max / 1e9 for f in sorted(set(s.budget_fractions))],
        "cells": cells,
        "wall_seconds": time.perf_counter() - t0,
    }
    result["fits"] = analyse(cells, eval_rows=s.eval_rows, resamples=s.resamples)
    (out_dir / "scaling.json").write_text(json.dumps(result, indent=1, default=str))
    write_report(result, out_dir, log=log)
    return result


def _starts(s: ScalingSettings, setup, out_dir: Path, sizes, bar) -> dict:
    """Each size's start checkpoint: the initial student, or quality's supervised warm-up.

    Returns the warm-up FLOPs per (hidden, seed) (empty without a warm-up)."""
    if s.warmup_steps > 0:
        jobs = [
            dict(
                s=quality_settings(s, r["hidden"]),
                setup=_size_setup(setup, out_dir, r["hidden"]),
                method="supervised_kd",
                seed=seed,
                steps=s.warmup_steps,
                lr=s.warmup_lr,
                warmup=True,
            )
            for r in sizes
            for seed in range(s.seeds)
        ]
        done = quality.run_jobs(jobs, s.workers, bar)
        return {(j["s"].student_hidden, j["seed"]): w["flops"] for j, w in zip(jobs, done)}
    for r in sizes:
        for seed in range(s.seeds):
            size_setup = _size_setup(setup, out_dir, r["hidden"])
            models = quality._models(size_setup, quality_settings(s, r["hidden"]), seed, None)
            path = Path(size_setup.out_dir) / "runs" / f"warmup-seed{seed}" / "student"
            models.student.save_pretrained(path)
    return {}


def _parser() -> argparse.ArgumentParser:
    # opd's parser: a bad option is one `opd: error:` line (exit 2), as for `opd distill`
    p = CliParser(prog="opd bench scaling", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="run folder (default runs/bench-scaling-<time>)")
    p.add_argument("--no-progress", action="store_true")
    for f in dataclasses.fields(ScalingSettings):
        if f.metadata.get("cli", True):
            d = f.default
            kw = (
                dict(nargs="+", type=f.metadata["item"])
                if isinstance(d, tuple)
                else dict(type=f.metadata.get("type", type(d)))
            )
            shown = " ".join(map(str, d)) if isinstance(d, tuple) else d
            doc = f.metadata["doc"].replace("%", "%%") + (
                "" if d is None else f" (default {shown})"
            )
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=d, help=doc, **kw)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    out = Path(args.pop("out") or f"runs/bench-scaling-{time.strftime('%Y%m%d-%H%M%S')}")
    quiet = args.pop("no_progress")
    for key in ("hidden", "budget_fractions"):
        args[key] = tuple(args[key])
    try:
        run_scaling(ScalingSettings(progress=not quiet, **args), out)
    except OpdError as e:
        print(f"opd: error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["ScalingSettings", "TeacherPreset", "main", "plan_sizes", "run_scaling"]
