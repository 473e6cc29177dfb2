"""Prefix sources: who writes the completion y that the loss is computed on.

- `dataset()`: the reference completion of each row (off-policy, supervised KD).
- `teacher()`: the teacher samples y (sequence-level KD, Kim & Rush 2016).
- `student()`: the student samples y (pure on-policy).
- `mix(student=λ, other="dataset")`: GKD (Agarwal et al., ICLR 2024): per batch, with
  probability λ the student writes y, else `other` does. λ=1 is on-policy, λ=0 off-policy.
  The coin is drawn from torch's global RNG, so a resumed run draws the same coins.

Every source returns a `Rollout`: prompts left-padded to P, completions right-padded to T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from opd.context import StepContext
from opd.errors import ConfigError, DataError
from opd.sampling.backends.hf import left_pad
from opd.types import Rollout


class PrefixSource(Protocol):
    """Writes completions for a batch of examples (see `opd.data.Example`)."""

    needs_completions: bool  # True if it reads the rows' reference completions
    needs_teacher_model: bool  # True if it runs the teacher for generation

    def rollout(self, examples: Sequence, ctx: StepContext) -> Rollout: ...

    def describe(self) -> str: ...


def make_rollout(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    writer: str,
    answers: Sequence = (),
    info: dict | None = None,
    raw_prompts: Sequence = (),
) -> Rollout:
    """Pack token lists into a `Rollout` (prompts left-padded, completions right-padded).

    A completion may be empty; its row then contributes no tokens. `raw_prompts` ([crosstok]):
    each row's prompt before the chat template (`opd.data.Example.raw_prompt`), or ().
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    ids_BP, pmask_BP = left_pad(prompts, pad_id)
    T = max(1, max(len(c) for c in completions))
    comp_BT = torch.full((len(completions), T), pad_id, dtype=torch.long)
    cmask_BT = torch.zeros((len(completions), T), dtype=torch.long)
    for i, c in enumerate(completions):
        if len(c):
            comp_BT[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long)
            cmask_BT[i, : len(c)] = 1
    return Rollout(
        input_ids_BL=torch.cat([ids_BP, comp_BT], dim=1),
        attention_mask_BL=torch.cat([pmask_BP, cmask_BT], dim=1),
        prompt_len=ids_BP.shape[1],
        completion_mask_BT=cmask_BT,
        writer=writer,
        answers=tuple(answers),
        info=dict(info or {}),
        raw_prompts=tuple(raw_prompts),
    )


def prompts_of(examples) -> list[tuple[int, ...]]:
    """The prompt token ids of a batch of `opd.data.Example`s."""
    return [ex.prompt_ids for ex in examples]


def raw_prompts_of(examples) -> tuple:
    """[crosstok] The prompts before the chat template (None where unknown)."""
    return tuple(getattr(ex, "raw_prompt", None) for ex in examples)


def answers_of(examples) -> list:
    """The reference answers (None where a row has none) of a batch of examples."""
    return [ex.answer for ex in examples]


@dataclass(frozen=True)
class DatasetPrefixes:
    """The rows' reference completions (truncated to max_new_tokens)."""

    needs_completions: bool = True
    needs_teacher_model: bool = False

    def rollout(self, examples, ctx: StepContext) -> Rollout:
        comps = []
        for ex in examples:
            if ex.completion_ids is None:
                raise DataError(
                    f"{ex.source}: the 'dataset' prefix source needs a 'completion' field "
                    "(or a final assistant message) in every row"
                )
            comps.append(ex.completion_ids[: ctx.params.max_new_tokens])
        return make_rollout(
            prompts_of(examples), comps, ctx.pad_id, "dataset", answers_of(examples)
        )

    def describe(self) -> str:
        return "dataset: the rows' reference completions"


@dataclass(frozen=True)
class TeacherPrefixes:
    """The teacher samples each completion (sequence-level KD)."""

    needs_completions: bool = False
    needs_teacher_model: bool = True

    def rollout(self, examples, ctx: StepContext) -> Rollout:
        if ctx.teacher is None:
            from opd.teachers.chat import text_teacher  # [black-box] a chat endpoint writes

            writer = text_teacher(ctx)
            if writer is None:
                raise ConfigError("the 'teacher' prefix source needs a teacher that writes text")
            comps = writer.write(examples, ctx)
        else:
            comps = ctx.generate(ctx.teacher, prompts_of(examples))
        return make_rollout(
            prompts_of(examples), comps, ctx.pad_id, "teacher", answers_of(examples)
        )

    def describe(self) -> str:
        return "teacher: the teacher samples y"


@dataclass(frozen=True)
class StudentPrefixes:
    """The student samples each completion (on-policy)."""

    needs_completions: bool = False
    needs_teacher_model: bool = False

    def rollout(self, examples, ctx: StepContext) -> Rollout:
        comps = ctx.generate(ctx.student, prompts_of(examples))
        return make_rollout(
            prompts_of(examples),
            comps,
            ctx.pad_id,
            "student",
            answers_of(examples),
            raw_prompts=raw_prompts_of(examples),  # [crosstok]
        )

    def describe(self) -> str:
        return "student: the student samples y (on-policy)"


_OTHERS = {"dataset": DatasetPrefixes(), "teacher": TeacherPrefixes()}


@dataclass(frozen=True)
class Mix:
    """GKD's mixture: with probability `student` the student writes y, else `other` does."""

    student: float = 0.5
    other: str = "dataset"

    def __post_init__(self):
        if not 0.0 <= self.student <= 1.0:
            raise ConfigError(f"mix: 'student' (lambda) must be in [0, 1], got {self.student}")
        if self.other not in _OTHERS:
            raise ConfigError(f"mix: 'other' must be one of {sorted(_OTHERS)}, got {self.other!r}")

    @property
    def needs_completions(self) -> bool:
        return self.other == "dataset" and self.student < 1.0

    @property
    def needs_teacher_model(self) -> bool:
        return self.other == "teacher" and self.student < 1.0

    def rollout(self, examples, ctx: StepContext) -> Rollout:
        # One coin per batch, from torch's global RNG (restored on resume).
        on_policy = bool(torch.rand(()) < self.student)
        source = StudentPrefixes() if on_policy else _OTHERS[self.other]
        ro = source.rollout(examples, ctx)
        ro.info["student_share"] = 1.0 if on_policy else 0.0
        return ro

    def describe(self) -> str:
        return f"mix: student writes y with probability {self.student}, else {self.other}"


def dataset() -> DatasetPrefixes:
    return DatasetPrefixes()


def teacher() -> TeacherPrefixes:
    return TeacherPrefixes()


def student() -> StudentPrefixes:
    return StudentPrefixes()


def mix(student: float = 0.5, other: str = "dataset") -> Mix:  # noqa: A002 - GKD's λ
    return Mix(student=student, other=other)
