"""The quality benchmark's shared off-policy warm-up, run to its plateau (`--warmup plateau`).

Every method of a seed continues from one warm-up checkpoint. With `--warmup fixed` (the
default) the warm-up is `warmup_steps` steps of supervised KD. With `--warmup plateau` it is
the same supervised KD (same lr: a `warmup_steps // 10`-step ramp, then constant) run in
segments of `warmup_eval_every` steps; after each segment the student's greedy exact-match
accuracy is measured on a validation split (`valid.jsonl`: prompts drawn from `VALID_SEED`,
none of them in the held-out set or the training pool), and the warm-up stops at the first
evaluation where the rule

    plateau_reached(acc, patience):  max(acc[-patience:]) <= max(acc[:-patience]) + min_delta
                                     and max(acc) >= acc[0] + MIN_RISE

holds: `patience` evaluations in a row without beating the best one before them by more than
`warmup_min_delta`, once the curve has risen at least `MIN_RISE` (10 points) above its first
evaluation (or at `warmup_max_steps`). The rise condition keeps a curve that is still at
its starting noise from passing for a plateau: on 8-step chains one seed's first evaluations
read 8, 4.5, 2, 6 % and the warm-up stopped at step 400 at 5 %, while the other seeds' curves
took off at step 400-500 and levelled out at 96-99 %. The checkpoint is the student at that step,
not the best one: after a plateau the two are within `min_delta` of each other, and the
methods then continue a student that has stopped learning off-policy, which is where
practitioners apply on-policy distillation (after SFT). The stopping step, the best step and
the validation curve are recorded per seed in `quality.json` (`warmup[i]["plateau"]`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from opd.bench.methods import prefixes_of
from opd.errors import ConfigError
from opd.tasks.teacher import evaluate_accuracy
from opd.train import save_student

VALID_SEED = 20_240_202
"""Seed of the validation split's prompt stream (held-out and training prompts removed)."""


MIN_RISE = 0.10
"""How far above its first evaluation the validation curve must have risen to plateau."""


def describe_warmup(s) -> str:
    """The warm-up and its stopping rule in words, for the benchmark's first log lines."""
    if s.warmup != "plateau":
        return f"warm-up: {s.warmup_steps} fixed steps of supervised_kd"
    return (
        f"warm-up: supervised_kd to the plateau (validation every {s.warmup_eval_every} steps, "
        f"patience {s.warmup_patience}, min delta {s.warmup_min_delta:g}, after a rise of "
        f"{MIN_RISE:g} over the first evaluation; at most {s.warmup_max_steps} steps)"
    )


def plateau_reached(
    accuracies: list[float], patience: int, min_delta: float = 0.0, min_rise: float = 0.0
) -> bool:
    """True when the last `patience` values do not beat the best earlier one by > min_delta,
    and the best value is at least `min_rise` above the first.

    Args:
      accuracies: validation accuracy at each evaluation so far, oldest first.
      patience: evaluations without improvement that end the warm-up (>= 1).
      min_delta: an improvement must exceed this to count.
      min_rise: the curve must first rise this far (the warm-up passes MIN_RISE).
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if len(accuracies) <= patience or max(accuracies) < accuracies[0] + min_rise:
        return False
    return max(accuracies[-patience:]) <= max(accuracies[:-patience]) + min_delta


def write_valid_split(s, task, knobs: dict, exclude: set[str], out_dir: Path) -> str:
    """Check the plateau settings of `s`, then write `out_dir/valid.jsonl`: up to
    `s.valid_rows` rows from `VALID_SEED` whose prompts are not in `exclude` (the held-out and
    training prompts); returns its path.

    Raises:
      ConfigError: for a plateau option below 1, or no validation prompt left.
    """
    for flag in ("valid_rows", "warmup_patience", "warmup_eval_every", "warmup_max_steps"):
        if getattr(s, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1 with --warmup plateau, "
                              f"got {getattr(s, flag)}")  # fmt: skip
    rows, seen = [], set(exclude)
    for row in task.generate(20 * s.valid_rows, VALID_SEED, **knobs):
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
            if len(rows) == s.valid_rows:
                break
    if not rows:
        raise ConfigError(f"task {task.name!r}: no validation prompt outside the held-out set "
                          "and the training pool; lower --train-rows")  # fmt: skip
    path = out_dir / "valid.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_plateau_warmup(s, setup, seed: int, models, train, evaluate, report=lambda n: None):
    """Supervised KD of `models.student` (fresh) until validation accuracy plateaus; saves it.

    `train` and `evaluate` are the quality benchmark's `train_segment` and `evaluate_student`
    (passed in: this module does not import the benchmark). Returns `run_method`'s warm-up
    record plus `plateau`: `{"stopped_at", "best_step", "max_steps_reached", "valid_curve":
    [{"step", "accuracy"}]}`.
    """
    run_dir = Path(setup.out_dir) / "runs" / f"warmup-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    valid = [json.loads(line) for line in Path(setup.valid_file).read_text().splitlines()]
    prefixes, max_steps = prefixes_of("supervised_kd"), s.warmup_max_steps
    schedule = (max(1, s.warmup_steps // 10), 1.0)
    flops = seconds = 0.0
    done, accs, curve = 0, [], []
    start = {"step": 0, "flops": 0.0, "seconds": 0.0, **evaluate(models, setup, s)}
    while done < max_steps:
        stop = min(max_steps, done + s.warmup_eval_every)
        f, sec, _ = train(s, setup, models, run_dir, "supervised_kd", max_steps, seed, s.warmup_lr,
                       schedule, done, stop, prefixes)  # fmt: skip
        flops, seconds = flops + f, seconds + sec
        report(stop - done)
        done = stop
        acc = evaluate_accuracy(models.student, models.tokenizer, setup.task, valid,
                                max_new_tokens=setup.max_new_tokens)  # fmt: skip
        accs.append(acc)
        curve.append({"step": done, "accuracy": acc})
        if plateau_reached(accs, s.warmup_patience, s.warmup_min_delta, MIN_RISE):
            break
    if not (run_dir / "student").is_dir():  # distill saves it only at max_steps
        save_student(models, run_dir / "student")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    best = curve[accs.index(max(accs))]["step"]
    point = {"step": done, "flops": flops, "seconds": seconds, **evaluate(models, setup, s)}
    return {
        "method": "supervised_kd", "seed": seed, "steps": done, "lr": s.warmup_lr,
        "flops": flops, "seconds": seconds, "curve": [start, point], "final": point,
        "plateau": {"stopped_at": done, "best_step": best, "max_steps_reached": done >= max_steps,
                    "valid_curve": curve},
    }  # fmt: skip
