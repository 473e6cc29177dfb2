"""`StepContext`: the one object the loop hands to every part of a method.

Prompt selectors (`select(stream, ctx)`), prefix sources (`rollout(examples, ctx)`), signals
(`signal(student, teacher, ctx)`) and token weights (`weight(values_N, ..., rollout, ctx)`) all
read the same context. `opd.run_setup.setup_run` builds it once per run with the run-wide
fields; `opd.step.train_step` sets `step` before each optimizer step and `micro_step` sets
`rollout` (and clears `metrics`) before each micro-batch is scored.

    progress = min(1, step / max(1, total_steps))   ∈ [0, 1], what schedules read

Numbers for the step row: a part that logs (`opd.parts.LogsMetrics`, e.g. `RewardWeighted`'s
`reward_mean`) calls `ctx.log(name, value)` during its call instead of writing into the
rollout; the loop reads `ctx.metrics` after each micro-batch and averages it over the step's
micro-batches, like the prefix sources' `rollout.info` (a fact of the rollout: mix share,
prefix length, sampler weights).

Every field has a default so that a test can build a context with only what a part reads,
e.g. `StepContext(chunk_size=4)` for a divergence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepContext:
    """Run-wide facts (set once) and per-step facts (updated by the loop).

    Run-wide attributes:
      student, teacher: the models (the teacher may be None for sources that never run it).
      backend, params: the generation backend and its `GenerationParams`.
      pad_id, stop_ids: padding id and the ids that end a completion.
      tokenizer: the shared tokenizer (reward signals and curricula decode completions).
      verify: `verify(text, answer) -> bool`, the task's verifier.
      total_steps: the run's length in optimizer steps.
      chunk_size: rows per chunk for the chunked losses.
      materialize: use the plain (N, V) reference path instead of the chunked one.
      models: the run's `opd.build.Models` (signals that need a reference model).

    Per-step attributes:
      step: the optimizer step, 0-based.
      rollout: the micro-batch being scored (sequence-level signals need the row structure);
        None while the rollouts are being written.
      metrics: numbers the parts reported for this micro-batch with `log`.
    """

    student: Any = None
    teacher: Any = None
    backend: Any = None
    params: Any = None
    pad_id: int = 0
    stop_ids: tuple[int, ...] = ()
    tokenizer: Any = None
    verify: Any = None
    total_steps: int = 1
    chunk_size: int = 512
    materialize: bool = False
    models: Any = None
    step: int = 0
    rollout: Any = None
    metrics: dict = field(default_factory=dict)

    @property
    def progress(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))

    def generate(self, model, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Completions of `prompts` by `model` with the run's backend and parameters."""
        return self.backend.generate(
            model, prompts, self.params, pad_id=self.pad_id, stop_ids=self.stop_ids
        )

    def log(self, name: str, value: float) -> None:
        """Report a number for this micro-batch's row of metrics.jsonl (see module doc)."""
        self.metrics[name] = float(value)
