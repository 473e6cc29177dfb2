"""Scaling-law fit of on-policy distillation (issue 12, item 8): the entry point.

    opd bench scaling --out runs/bench-scaling            # the default grid
    opd bench scaling --hidden 16 32 48 64 96 --seeds 3   # a larger one

(this script runs the same `opd.bench.scaling.main`, with the same options).

Trains (or loads from the cache) the task teacher, distils students of ≥ 4 widths at ≥ 3
equal FLOP budgets with one on-policy recipe, and fits held-out KL(q_student ‖ p_teacher) and
the error rate to L = E + A·N^(−α) + B·C^(−β) with bootstrap CIs. Writes scaling.json,
results.md and scaling.png into --out. The method, the deviations from the survey's
equation 37 and the compute accounting are in `opd.bench.scaling` / `opd.bench.scaling_fit`
and docs/scaling.md; `--help` lists every option.
"""

from __future__ import annotations

import sys

from opd.bench.scaling import main

if __name__ == "__main__":
    sys.exit(main())
