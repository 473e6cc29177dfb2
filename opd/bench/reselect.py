"""Re-apply the current stability rule and lr choice to a finished `opd bench quality --lrs` run.

    python -m opd.bench.reselect RUN_DIR [--workers 2]

For a run folder whose `quality.json` has a sweep: every sweep run's stability record is
rebuilt with the current `opd.bench.stability` rule from its own `metrics.jsonl` losses and
its stored evaluations, the lr of each method is chosen again (`opd.bench.sweep.choose_lr`),
and only the methods whose lr changed are trained again, every seed, at the new lr, from the
same warm-up checkpoints (`runs/warmup-seedN/student`); nothing else is retrained. Then
`quality.json` (with `reselected: {"changed", "previous"}`) and `results.md` are rewritten. The
teacher is the sweep's, from the cache (its preset is in the settings); if the settings name no
cached teacher, a ConfigError, never a newly trained one.
The same seed and lr make the same run, so the result equals a fresh sweep under the current
rule (the held-out set is still never used to choose).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from opd.bench.methods import slug
from opd.bench.plots import summarize, write_report
from opd.bench.quality import Settings, prepare_task, run_jobs, teacher_kwargs
from opd.bench.stability import collapse_record
from opd.bench.sweep import attach_stability, choose_lr
from opd.errors import ConfigError
from opd.tasks.teacher import TeacherPreset, train_task_teacher


def _losses(out_dir: Path, method: str, lr: float) -> list[float]:
    path = out_dir / "runs" / f"{slug(method)}-lr{lr:g}-seed0" / "metrics.jsonl"
    return [float(json.loads(line)["loss"]) for line in path.read_text().splitlines() if line]


def reselect(out_dir: Path, workers: int = 2, log=print) -> dict:
    """Rebuild the stability records, choose again, rerun the changed methods; the new result."""
    out_dir = Path(out_dir)
    result = json.loads((out_dir / "quality.json").read_text())
    sweep = result.get("sweep")
    if not sweep:
        raise ConfigError(f"{out_dir / 'quality.json'}: no lr sweep to re-select (run with --lrs)")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in result["settings"].items()}
    if isinstance(fields.get("teacher_preset"), dict):  # a variant's or a test's own preset
        fields["teacher_preset"] = TeacherPreset(**fields["teacher_preset"])
    s = Settings(**{**fields, "progress": False, "workers": workers})
    # the sweep's teacher from the cache, never a newly trained one (ConfigError if absent)
    train_task_teacher(s.task, **teacher_kwargs(s), cached_only=True)
    start = {w["seed"]: w["final"] for w in result["warmup"]}
    for r in sweep["runs"]:
        r["stability"] = collapse_record(_losses(out_dir, r["method"], r["lr"]), r["heldout"],
                                         start[0], r["lr"])  # fmt: skip
    previous = dict(sweep["chosen"])
    chosen = {m: choose_lr([r for r in sweep["runs"] if r["method"] == m])["lr"] for m in previous}
    changed = [m for m in previous if chosen[m] != previous[m]]
    log(
        f"[{result['task']}] lr changed for {changed or 'no method'}: "
        + ", ".join(f"{m} {previous[m]:g} -> {chosen[m]:g}" for m in changed)
    )
    setup = prepare_task(s, out_dir)  # the same files, the cached teacher
    steps = result["compute"]["steps"]
    jobs = [dict(s=s, setup=setup, method=m, seed=seed, steps=steps[m], lr=chosen[m])
            for m in changed for seed in range(s.seeds)]  # fmt: skip
    with tqdm(total=sum(j["steps"] for j in jobs), desc="reselect", unit="step") as bar:
        fresh = run_jobs(jobs, workers, bar) if jobs else []
    runs = [r for r in result["runs"] if r["method"] not in changed] + fresh
    attach_stability(runs, result["warmup"])
    sweep["chosen"] = chosen
    result.update(runs=runs, summary=summarize(runs, s.methods),
                  reselected={"changed": changed, "previous": previous})  # fmt: skip
    (out_dir / "quality.json").write_text(json.dumps(result, indent=1, default=str))
    write_report(result, out_dir, log=log)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opd.bench.reselect", description=__doc__)
    p.add_argument("run_dir", help="an `opd bench quality --lrs ...` output folder")
    p.add_argument("--workers", type=int, default=2, help="runs side by side (default 2)")
    a = p.parse_args(argv)
    reselect(Path(a.run_dir), a.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
