"""The quality benchmark's per-method learning-rate sweep (`opd bench quality --lrs A B C`).

Every method gets the same sweep: seed 0 is trained at each learning rate of `--lrs` (from
the seed's warm-up checkpoint, at the method's equal-compute step count), and scored at the
end on the validation split (`valid.jsonl`, `opd.bench.warmup.write_valid_split`: prompts in
neither the held-out set nor the training pool). The method's learning rate is the one with

    the highest validation accuracy; ties by the lower validation KL(q_student ‖ p_teacher),
    then by the smaller lr; runs flagged as collapsed (`opd.bench.stability`) are passed
    over unless every lr collapsed.

Seeds 1 … n−1 then run at the chosen lr; seed 0's result is its sweep run at that lr (the
same seed and lr make the same run, so it is not repeated). The held-out set is never used to
choose. Every sweep run's validation score and stability record is kept in `quality.json`
(`sweep`) and tabled in `results.md`, so the lr at which a method collapsed is on record.
Without `--lrs` (or with one value) every method runs at `--lr`, as before.
"""

from __future__ import annotations

import math

from opd.bench.methods import label
from opd.bench.stability import collapse_record


def attach_stability(runs: list[dict], warmups: list[dict]) -> None:
    """Give each run its `stability` record against its seed's warm-up checkpoint."""
    start = {w["seed"]: w["final"] for w in warmups}
    for r in runs:
        r["stability"] = collapse_record(r.get("losses", []), r["final"], start[r["seed"]],
                                         r["lr"])  # fmt: skip


def choose_lr(candidates: list[dict]) -> dict:
    """The sweep run whose lr is chosen (the rule of the module docstring)."""
    ok = [r for r in candidates if not r["stability"]["collapsed"]] or candidates

    def key(r):
        kl = r["valid"].get("teacher_kl")
        return (-r["valid"]["accuracy"], kl if kl is not None and math.isfinite(kl) else math.inf,
                r["lr"])  # fmt: skip

    return min(ok, key=key)


def run_methods(s, common: dict, steps: dict, warmups: list[dict], run_jobs, bar):
    """All method runs of a sweep; returns (runs, sweep record or None)."""
    lrs = tuple(dict.fromkeys(s.lrs or ()))
    if len(lrs) <= 1:
        lr = lrs[0] if lrs else s.lr
        runs = run_jobs(
            [
                dict(common, method=m, seed=seed, steps=steps[m], lr=lr)
                for seed in range(s.seeds)
                for m in s.methods
            ],
            s.workers,
            bar,
        )
        attach_stability(runs, warmups)
        return runs, None
    tried = run_jobs([dict(common, method=m, seed=0, steps=steps[m], lr=lr, valid=True)
                      for m in s.methods for lr in lrs], s.workers, bar)  # fmt: skip
    attach_stability(tried, warmups)
    chosen = {m: choose_lr([r for r in tried if r["method"] == m]) for m in s.methods}
    rest = run_jobs(
        [
            dict(common, method=m, seed=seed, steps=steps[m], lr=chosen[m]["lr"])
            for seed in range(1, s.seeds)
            for m in s.methods
        ],
        s.workers,
        bar,
    )
    attach_stability(rest, warmups)
    runs = [chosen[m] for m in s.methods] + rest
    sweep = {
        "lrs": list(lrs),
        "chosen": {m: chosen[m]["lr"] for m in s.methods},
        "runs": [
            {
                "method": r["method"],
                "lr": r["lr"],
                "valid": r["valid"],
                "heldout": r["final"],
                "stability": r["stability"],
            }
            for r in tried
        ],
    }
    return runs, sweep


def sweep_markdown(sweep: dict) -> str:
    """One row per method: validation accuracy and KL at each lr, the chosen lr, collapses."""
    lrs = sweep["lrs"]
    head = " | ".join(f"lr {lr:g}: valid acc % / KL(q‖p)" for lr in lrs)
    lines = [
        f"| method | {head} | chosen lr | collapsed at |",
        "|---|" + "---:|" * len(lrs) + "---:|---|",
    ]
    for method, lr_chosen in sweep["chosen"].items():
        cells, fell = [], []
        for lr in lrs:
            r = next(x for x in sweep["runs"] if x["method"] == method and x["lr"] == lr)
            kl = r["valid"].get("teacher_kl")
            cells.append(
                f"{100 * r['valid']['accuracy']:.1f} / " + (f"{kl:.3f}" if kl is not None else "—")
            )
            if r["stability"]["collapsed"]:
                fell.append(f"{lr:g} ({', '.join(r['stability']['reasons'])})")
        lines.append(
            f"| {label(method)} | {' | '.join(cells)} | {lr_chosen:g} "
            f"| {'; '.join(fell) or 'none'} |"
        )
    return "\n".join(lines)
