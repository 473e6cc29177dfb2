"""`SignalContext`: the run-time facts a signal or token weight may read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SignalContext:
    """Run-time facts a signal or token weight may need.

    Attributes:
      step, total_steps: the optimizer step (0-based) and the run's length; schedules read
        `progress` = step / total_steps in [0, 1].
      chunk_size: rows per chunk for the chunked losses.
      materialize: use the plain (N, V) reference path instead of the chunked one.
      rollout: the micro-batch's rollout (sequence-level signals need the row structure).
      tokenizer: the shared tokenizer (reward signals decode completions).
      verify: `verify(text, answer) -> bool`, the task's verifier (reward signals).
    """

    step: int = 0
    total_steps: int = 1
    chunk_size: int = 512
    materialize: bool = False
    rollout: object = None
    tokenizer: object = None
    verify: object = None
    models: object = None  # opd.build.Models: for signals that need a reference model

    @property
    def progress(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))
