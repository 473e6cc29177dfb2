"""`prefix(L)`: sample, and compute the loss on, only the first L completion tokens.

Fast OPD (Zhang et al., "Fast and Effective On-policy Distillation from Reasoning Prefixes",
2026): on-policy distillation whose training signal concentrates in the first tokens of each
output, so the student's sampling is stopped early and the loss covers only that prefix:

    y_{1..L} ~ q_student(. | x)          (generation capped at L = min(L, max_new_tokens))
    loss on completion tokens t ≤ L      (completion_mask_BT has ≤ L ones per row)

The paper also grows the trained prefix during training; `length_end` gives that linear
schedule: L(progress) = round(L_0 + (L_1 − L_0)·progress), progress = step / total_steps.

Any prefix source can be wrapped (`inner`, default the student): the context's
`max_new_tokens` is lowered to L before the inner source runs, and its rollout is cut to L
completion tokens afterwards (for inner sources that ignore the cap, e.g. replayed samples).

Deviations: none in the sampling; the paper's prefix-length defaults are not reproduced
(opd's default L = 512 is a choice, not the paper's number).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from opd.context import StepContext
from opd.errors import ConfigError
from opd.sampling.sources import StudentPrefixes
from opd.types import Rollout


def truncate_rollout(ro: Rollout, length: int) -> Rollout:
    """Keep only the first `length` ≥ 1 completion tokens of every row (as is if already short)."""
    T = ro.completion_mask_BT.shape[1]
    if T <= length:
        return ro
    P = ro.prompt_len
    return replace(
        ro,
        input_ids_BL=ro.input_ids_BL[:, : P + length],
        attention_mask_BL=ro.attention_mask_BL[:, : P + length],
        completion_mask_BT=ro.completion_mask_BT[:, :length],
        token_weight_BT=None if ro.token_weight_BT is None else ro.token_weight_BT[:, :length],
    )


@dataclass(frozen=True)
class Prefix:
    """Cap the inner source's completions at the first L tokens (Fast OPD).

    Attributes:
      length: L, the number of completion tokens sampled and trained on (at progress 0).
      inner: the prefix source that writes the tokens (default: the student).
      length_end: if set, L grows linearly to this value at the end of training.
    """

    length: int = 512
    inner: object = field(default_factory=StudentPrefixes)
    length_end: int | None = None

    def __post_init__(self):
        for name in ("length", "length_end"):
            v = getattr(self, name)
            if v is not None and (int(v) != v or v < 1):
                raise ConfigError(f"prefix: '{name}' must be a positive integer, got {v}")

    @property
    def needs_completions(self) -> bool:
        return bool(getattr(self.inner, "needs_completions", False))

    @property
    def needs_teacher_model(self) -> bool:
        return bool(getattr(self.inner, "needs_teacher_model", False))

    def length_at(self, progress: float) -> int:
        """L at training progress in [0, 1]."""
        if self.length_end is None:
            return int(self.length)
        p = min(1.0, max(0.0, progress))
        return int(round(self.length + (self.length_end - self.length) * p))

    def rollout(self, examples, ctx: StepContext) -> Rollout:
        L = self.length_at(ctx.step / max(1, ctx.total_steps))
        capped = replace(
            ctx, params=replace(ctx.params, max_new_tokens=min(L, ctx.params.max_new_tokens))
        )
        ro = truncate_rollout(self.inner.rollout(examples, capped), L)
        ro.info["prefix_length"] = float(L)
        return ro

    # A stateful inner source (a replay buffer) is checkpointed through this wrapper.
    def state_dict(self) -> dict:
        return self.inner.state_dict() if hasattr(self.inner, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(state)

    def describe(self) -> str:
        L = f"{self.length}→{self.length_end}" if self.length_end is not None else f"{self.length}"
        return f"prefix: first {L} completion tokens of [{self.inner.describe()}]"


def prefix(length: int = 512, inner=None, length_end: int | None = None) -> Prefix:
    return Prefix(
        length=length,
        inner=inner if inner is not None else StudentPrefixes(),
        length_end=length_end,
    )
