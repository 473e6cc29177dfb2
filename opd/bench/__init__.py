"""Benchmarks: what distillation buys (`quality`) and what it costs (`speed`).

- `opd.bench.quality`: off-policy vs on-policy recipes at equal estimated FLOPs on a
  synthetic task with a from-scratch teacher; accuracy and held-out teacher KL over seeds.
  Compute accounting in `opd.bench.flops`, method strings in `opd.bench.methods`.
- `opd.bench.speed`: opd vs TRL on identical tiny models (seconds/step, completion
  tokens/s, peak memory; workers in `opd.bench.step_workers`), and the chunked-loss
  microbenchmark (`opd.bench.loss_worker`).
- `opd.bench.plots`: the reports of both (tables, figures); it imports no benchmark.
- `opd.bench.memory` (peak RSS) and `opd.bench.environment` (`machine()`) are shared.

Module dependencies run one way: quality, speed -> plots -> methods, step_workers,
loss_worker -> memory, environment. Command-line entry points: `main_quality(argv)` and
`main_speed(argv)`.
"""

from __future__ import annotations

from opd.bench.environment import machine
from opd.bench.quality import main as main_quality
from opd.bench.speed import main as main_speed

__all__ = ["machine", "main_quality", "main_speed"]
