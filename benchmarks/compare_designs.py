"""README tables from `opd bench quality` runs: the new design per task, and old vs new design.

    python benchmarks/compare_designs.py --runs RUN_chain_fix RUN_sort_fix --old RUN_chain \
        --out benchmarks/results_quality_recovery.md

Each RUN is the `--out` folder of one `opd bench quality --task T` run (its `quality.json`).
Tables (mean ± sample std over seeds; paired differences are per seed, same warm-up
checkpoint):

1. per task: the teacher's clean and recovery accuracy (final answer right when continuing a
   held-out prefix with 1 / 2 / 3 injected errors), then per method the chosen lr, accuracy,
   held-out KL(q_student ‖ p_teacher) on the student's greedy text and KL(p_teacher ‖
   q_student) on the teacher's, completions with a correction marker, collapsed runs;
2. per task: each method's accuracy minus supervised KD's, per seed;
3. old vs new design: for the methods both runs have, accuracy and the paired difference to
   supervised KD on the clean task (old) and its recoverable variant (new), and the change of
   the mean gap (a difference of means: the two tasks' seeds are not paired).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from opd.bench.methods import label
from opd.bench.plots import paired_markdown


def _pm(xs, scale=1.0, digits=1) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{scale * statistics.mean(xs):.{digits}f} ± {scale * sd:.{digits}f}"


def _finals(result: dict, method: str, key: str) -> list:
    return [r["final"].get(key) for r in result["runs"] if r["method"] == method]


def _gaps(result: dict, method: str) -> list[float]:
    base = {r["seed"]: r["final"]["accuracy"] for r in result["runs"]
            if r["method"] == "supervised_kd"}  # fmt: skip
    return [100 * (r["final"]["accuracy"] - base[r["seed"]]) for r in result["runs"]
            if r["method"] == method and r["seed"] in base]  # fmt: skip


def task_table(result: dict) -> str:
    t = result["teacher"]
    rec = t.get("recovery_accuracy") or {}
    lines = [f"**`{result['task']}`**: teacher clean accuracy {100 * t['eval']['accuracy']:.1f} %, "
             "recovery from 1 / 2 / 3 errors "
             + " / ".join(f"{100 * rec[k]:.1f}" for k in sorted(rec)) + " %; "
             "warm-up to the plateau at "
             + "/".join(str(w["steps"]) for w in result["warmup"]) + " steps (per seed).", "",
             "| method | lr | accuracy % | KL(q_student ‖ p_teacher), student text "
             "| KL(p_teacher ‖ q_student), teacher text | with a correction % | collapsed |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    w = [x["final"] for x in result["warmup"]]
    lines.append(
        f"| warm-up checkpoint | — | {_pm([x['accuracy'] for x in w], 100)} "
        f"| {_pm([x['teacher_kl'] for x in w], 1, 4)} "
        f"| {_pm([x.get('teacher_fkl') for x in w], 1, 4)} "
        f"| {_pm([x.get('with_correction') for x in w], 100)} | — |"
    )
    for m, row in result["summary"].items():
        lines.append(
            f"| {label(m)} | {row['lr']:g} | {_pm(_finals(result, m, 'accuracy'), 100)} "
            f"| {_pm(_finals(result, m, 'teacher_kl'), 1, 4)} "
            f"| {_pm(_finals(result, m, 'teacher_fkl'), 1, 4)} "
            f"| {_pm(_finals(result, m, 'with_correction'), 100)} "
            f"| {row['collapsed']}/{row['seeds']} |"
        )
    return "\n".join(lines)


def design_table(old: dict, new: dict) -> str:
    methods = [m for m in new["summary"] if m in old["summary"]]
    lines = [
        f"| method | `{old['task']}` accuracy % | − supervised KD | `{new['task']}` accuracy % "
        "| − supervised KD | change of the gap |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        go, gn = _gaps(old, m), _gaps(new, m)
        change = (
            f"{statistics.mean(gn) - statistics.mean(go):+.1f}"
            if m != "supervised_kd" and go and gn
            else "—"
        )  # different tasks: not paired
        lines.append(
            f"| {label(m)} | {_pm(_finals(old, m, 'accuracy'), 100)} "
            f"| {_pm(go) if m != 'supervised_kd' else '—'} "
            f"| {_pm(_finals(new, m, 'accuracy'), 100)} "
            f"| {_pm(gn) if m != 'supervised_kd' else '—'} | {change} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="quality run folders (new design)")
    p.add_argument("--old", default=None, help="a quality run folder of the old design")
    p.add_argument("--out", default=None, help="write the markdown here too")
    a = p.parse_args(argv)
    results = [json.loads((Path(d) / "quality.json").read_text()) for d in a.runs]
    parts = []
    for r in results:
        parts += [task_table(r), "", "Paired per-seed differences:", "", paired_markdown(r), ""]
    if a.old:
        old = json.loads((Path(a.old) / "quality.json").read_text())
        parts += [task_table(old), "", paired_markdown(old), ""]
        new = next((r for r in results if r["task"] == f"{old['task']}_fix"), None)
        if new:
            parts += [
                "Old design vs new, same held-out problems (paired per seed):",
                "",
                design_table(old, new),
                "",
            ]
    text = "\n".join(parts)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
