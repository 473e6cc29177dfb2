"""`replay(...)`: DistiLLM's adaptive off-policy use of student-generated outputs.

DistiLLM (Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models",
ICML 2024) trains on a mix of the dataset's completions and student-generated outputs (SGOs)
and keeps SGOs in a replay buffer of fixed capacity (1000 examples) to reuse them. Each batch
draws r ~ U(0, 1) and, with ρ the probability of training on SGOs and p = step/total_steps:

    r < ρ·(1 − p), or r < ρ while the buffer is not full   -> the student writes fresh
                                                              completions (pushed to the buffer)
    otherwise r < ρ                                        -> B buffered (prompt, completion)
                                                              pairs drawn uniformly, replayed
    otherwise                                              -> `other` writes ("dataset")

so the share of fresh samples among SGOs falls over training (DistiLLM's default
"decreasing" replay ratio). The buffer is first-in first-out; a replayed batch replaces the
batch's prompts with the buffered ones, as in DistiLLM.

Deviation: DistiLLM starts ρ at `init_threshold` (0 for its GPT-2 runs) and raises it by 0.1
whenever the validation loss rose by at least ε since the last raise. opd's training loop does
not give prefix sources a validation loss, so ρ follows a schedule instead,
ρ(p) = ρ_start + (ρ_end − ρ_start)·p (default 0 → 1): the student's share grows as training
goes on, as it does in DistiLLM when validation loss keeps rising.

The coin and the replay draw use torch's global RNG and the buffer is checkpointed
(`state_dict` holds token lists), so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

from collections import deque

import torch

from opd.context import StepContext
from opd.errors import ConfigError
from opd.sampling.sources import DatasetPrefixes, TeacherPrefixes, make_rollout
from opd.types import Rollout

_OTHERS = {"dataset": DatasetPrefixes, "teacher": TeacherPrefixes}


class Replay:
    """Fresh or replayed student samples with probability ρ, else `other` (DistiLLM).

    Args:
      capacity: the most (prompt, completion) pairs the buffer holds (DistiLLM: 1000).
      rho_start, rho_end: ρ, the probability of training on student outputs, at the start and
        at the end of training (linear in between).
      other: who writes the remaining batches: "dataset" (DistiLLM) or "teacher".
    """

    def __init__(
        self,
        capacity: int = 1000,
        rho_start: float = 0.0,
        rho_end: float = 1.0,
        other: str = "dataset",
    ):
        if int(capacity) != capacity or capacity < 1:
            raise ConfigError(f"replay: 'capacity' must be a positive integer, got {capacity}")
        for name, v in (("rho_start", rho_start), ("rho_end", rho_end)):
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"replay: '{name}' must be in [0, 1], got {v}")
        if other not in _OTHERS:
            raise ConfigError(f"replay: 'other' must be one of {sorted(_OTHERS)}, got {other!r}")
        self.capacity, self.rho_start, self.rho_end, self.other = (
            int(capacity),
            rho_start,
            rho_end,
            other,
        )
        self.buffer: deque = deque(maxlen=self.capacity)  # of (prompt_ids, completion_ids, answer)

    @property
    def needs_completions(self) -> bool:
        return self.other == "dataset" and min(self.rho_start, self.rho_end) < 1.0

    @property
    def needs_teacher_model(self) -> bool:
        return self.other == "teacher" and min(self.rho_start, self.rho_end) < 1.0

    def rho(self, progress: float) -> float:
        p = min(1.0, max(0.0, progress))
        return self.rho_start + (self.rho_end - self.rho_start) * p

    def rollout(self, examples, ctx: StepContext) -> Rollout:
        progress = min(1.0, ctx.step / max(1, ctx.total_steps))
        rho = self.rho(progress)
        r = float(torch.rand(()))  # one coin per batch, global RNG (restored on resume)
        if r < rho * (1.0 - progress) or (r < rho and len(self.buffer) < self.capacity):
            ro, fresh, replayed = self._fresh(examples, ctx), 1.0, 0.0
        elif r < rho:
            ro, fresh, replayed = self._replay(len(examples), ctx), 0.0, 1.0
        else:
            ro, fresh, replayed = _OTHERS[self.other]().rollout(examples, ctx), 0.0, 0.0
        ro.info.update(
            student_share=fresh + replayed,
            replayed=replayed,
            rho=rho,
            buffer_size=float(len(self.buffer)),
        )
        return ro

    def _fresh(self, examples, ctx: StepContext) -> Rollout:
        prompts = [tuple(ex.prompt_ids) for ex in examples]
        comps = ctx.generate(ctx.student, prompts)
        for ex, p, c in zip(examples, prompts, comps):
            self.buffer.append((p, tuple(c), ex.answer))
        return make_rollout(prompts, comps, ctx.pad_id, "student", [ex.answer for ex in examples])

    def _replay(self, B: int, ctx: StepContext) -> Rollout:
        n = len(self.buffer)
        # Without replacement (DistiLLM's random.sample) when the buffer holds a batch.
        idx = torch.randperm(n)[:B] if n >= B else torch.randint(n, (B,))
        picked = [self.buffer[i] for i in idx.tolist()]
        return make_rollout(
            [p for p, _, _ in picked],
            [c for _, c, _ in picked],
            ctx.pad_id,
            "student",
            [a for _, _, a in picked],
        )

    def state_dict(self) -> dict:
        """The buffer as JSON-serialisable token lists, oldest first."""
        return {"entries": [[list(p), list(c), a] for p, c, a in self.buffer]}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = deque(
            ((tuple(p), tuple(c), a) for p, c, a in state.get("entries", [])), maxlen=self.capacity
        )

    def describe(self) -> str:
        return (
            f"replay: student outputs with probability ρ = {self.rho_start}→{self.rho_end} "
            f"(fresh share ρ·(1−progress), else from a {self.capacity}-sample buffer), "
            f"else {self.other}"
        )


def replay(
    capacity: int = 1000, rho_start: float = 0.0, rho_end: float = 1.0, other: str = "dataset"
) -> Replay:
    return Replay(capacity=capacity, rho_start=rho_start, rho_end=rho_end, other=other)
