"""Scaling-law fit of on-policy distillation (issue 12, item 8): the entry point.

    python benchmarks/bench_scaling.py --out runs/bench-scaling            # the default grid
    python benchmarks/bench_scaling.py --hidden 16 32 48 64 96 --seeds 3   # a larger one

Trains (or loads from the cache) the task teacher, distils students of ≥ 4 widths at ≥ 3
equal FLOP budgets with one on-policy recipe, and fits held-out KL(q_student ‖ p_teacher) and
the error rate to L = E + A·N^(−α) + B·C^(−β) with bootstrap CIs. Writes scaling.json,
results.md and scaling.png into --out. The method, the deviations from the survey's
equation 37 and the compute accounting are in `opd.bench.scaling` / `opd.bench.scaling_fit`
and docs/scaling.md; `--help` lists every option. (There is no `opd bench scaling` yet: the
`bench` sub-command's choices live in opd/cli.py.)
"""

from __future__ import annotations

import sys

from opd.bench.scaling import main

if __name__ == "__main__":
    sys.exit(main())
