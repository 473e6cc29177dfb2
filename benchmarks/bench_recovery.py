"""Do task teachers recover from a wrong value? A clean-trained vs a corrupted-prefix teacher.

Trains (or loads from the cache) two teachers of the same size on the same chain problems,
for the same number of steps and seed:

    clean      task `chain`      (plain supervised cross-entropy on reference completions)
    recover    task `chain_fix`  (the same, with a fraction of rows carrying 1..m injected,
                                  corrected errors; the wrong values' loss masked)

and reports, on the same 200 held-out problems (the two tasks share prompts): clean accuracy
(greedy, exact final answer), recovery accuracy for 1, 2 and 3 errors (greedy continuation of
a corrupted prefix that ends right after a wrong value, scored with `chain_fix`'s verifier,
which applies the corrections; `opd.tasks.recovery`), with one error split by where the wrong
value is (a running value or the final answer; chain only), the share of clean completions
with a correction marker (false alarms), and training seconds. One thread (the machine is shared).

    python benchmarks/bench_recovery.py [--steps 600] [--task chain] [--out ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from opd.tasks import get_task
from opd.tasks.recoverable import count_corrections
from opd.tasks.recovery import corrupted_prefixes, recovery_report, recovery_task
from opd.tasks.teacher import EVAL_SEED, PRESETS, generate_completions, train_task_teacher


def score(model, tok, base: str, rows: list[dict]) -> dict:
    """Clean accuracy with the recoverable verifier, the share of completions with a marker
    (false alarms on clean prompts), recovery with one error by slot, and three samples."""
    fix = recovery_task(base)
    ids = tok([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    longest = max(map(len, ids)) + 8
    texts = generate_completions(model, tok, [r["prompt"] for r in rows], longest)
    prefixes = corrupted_prefixes(fix, rows, 1)  # the prefixes of recovery_accuracy(n_errors=1)
    cont = generate_completions(
        model, tok, [r["prompt"] + p for r, p in zip(rows, prefixes)], longest
    )  # the budget of recovery_accuracy
    by_slot = {"running_value": [0, 0], "final_answer": [0, 0]}  # [recovered, prefixes]
    for r, p, c in zip(rows, prefixes, cont):
        counts = by_slot["final_answer" if "=>" in p else "running_value"]
        counts[0] += fix.verify(p + c, r["answer"])
        counts[1] += 1
    return {
        "accuracy_fix_verifier": sum(fix.verify(t, r["answer"]) for t, r in zip(texts, rows))
        / len(rows),
        "with_marker": sum(count_corrections(t) > 0 for t in texts) / len(rows),
        "samples": texts[:3],
        "recovery_by_slot_1_error": by_slot,
        "recovery_samples": [f"{p}|{c}" for p, c in zip(prefixes[:3], cont)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="chain", choices=["chain", "sort"])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="benchmarks/results_recovery.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    fix = recovery_task(args.task).name
    rows = get_task(args.task).generate(200, EVAL_SEED)  # the teachers' held-out set (seed 0)
    results = {"task": args.task, "steps": args.steps, "teachers": {}}
    for name in (args.task, fix):
        t0 = time.perf_counter()
        model, tok, info = train_task_teacher(name, steps=args.steps, cache_dir=args.cache_dir,
                                              progress=False, num_threads=1)  # fmt: skip
        preset = dataclasses.asdict(PRESETS[name])
        results["teachers"][name] = {
            "preset": {**preset, "steps": args.steps},
            "params": info["params"],
            "train_seconds": info["train_seconds"],
            "wall_seconds": round(time.perf_counter() - t0, 1),  # training + evaluation
            "cached": info["cached"],  # loaded from the cache: train_seconds are the original
            "accuracy": info["accuracy"],
            "recovery_accuracy": info.get("recovery_accuracy")
            or recovery_report(model, tok, args.task, rows),
            **score(model, tok, args.task, rows),
        }
        print(json.dumps({name: results["teachers"][name]}, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
