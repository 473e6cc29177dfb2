"""Combinators: parts built from other parts, chosen by training progress or by writer.

- `ByProgress(stages)`: use one part (a signal or a prefix source) until a progress
  boundary, then the next: the divergence schedule (FKL first, RKL after) of PACED and the
  survey's staged budget (off-policy warm-up, on-policy, reward-guided).
- `ByWriter(parts)`: pick the signal by who wrote the completions (DistiLLM-2: skew forward
  KL on teacher outputs, skew reverse KL on student outputs), per row of the batch.
- `Paired(sources)`: every source writes a completion for every prompt of the batch, and
  the rollout holds all of them (B·len(sources) rows, `Rollout.row_writers` says whose):
  DistiLLM-2's pair of the teacher's and the student's response to the same prompt.
- `two_stage_kl(split)`: PACED's schedule, KL(p_teacher ‖ q_student) until progress
  `split`, then KL(q_student ‖ p_teacher) (a `ByProgress`).
- `prefix_source(name, lmbda)`: a prefix source by name ("student", "dataset", "teacher",
  "mix"), for recipes that expose the choice.

A combinator's `requires` is the union of its parts' (`opd.signals.schedules.requirements`),
and `labelled_parts()` lists its parts so that `Method` checks every stage at construction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from opd.errors import ConfigError
from opd.sampling import dataset, mix, student, teacher
from opd.sampling.sources import make_rollout
from opd.signals.divergence import Divergence
from opd.signals.schedules import requirements

PREFIX_SOURCES = ("student", "dataset", "teacher", "mix")


@dataclass(frozen=True)
class ByProgress:
    """Stages `((until_1, part_1), (until_2, part_2), ...)`, boundaries in (0, 1], increasing.

    Works for signals and prefix sources (both called with the loop's `opd.context
    .StepContext`); the stage is chosen by step / total_steps.
    """

    stages: tuple

    def __post_init__(self):
        bounds = [b for b, _ in self.stages]
        if (
            not bounds
            or any(not 0 < b <= 1 for b in bounds)
            or bounds != sorted(bounds)
            or bounds[-1] != 1.0
        ):
            raise ConfigError(
                f"ByProgress: stage boundaries must increase within (0, 1] and end at 1.0, got {bounds}"
            )

    def part_at(self, progress: float):
        for until, part in self.stages:
            if progress < until:
                return part
        return self.stages[-1][1]

    def _progress(self, ctx) -> float:
        return ctx.step / max(1, ctx.total_steps)

    # --- as a signal -------------------------------------------------------------------
    @property
    def requires(self) -> frozenset:
        """Every teacher output some stage needs (the union over the stages)."""
        return frozenset().union(*(requirements(p) for _, p in self.stages))

    def labelled_parts(self) -> tuple:
        """((label, part), ...): each stage with its progress range, for checks and errors."""
        out, lo = [], 0.0
        for until, part in self.stages:
            out.append((f"stage [{lo:.0%}–{until:.0%})", part))
            lo = until
        return tuple(out)

    def __call__(self, student, teacher, ctx):
        return self.part_at(self._progress(ctx))(student, teacher, ctx)

    # --- as a prefix source ------------------------------------------------------------
    @property
    def needs_completions(self) -> bool:
        return any(getattr(p, "needs_completions", False) for _, p in self.stages)

    @property
    def needs_teacher_model(self) -> bool:
        return any(getattr(p, "needs_teacher_model", False) for _, p in self.stages)

    def rollout(self, examples, ctx):
        return self.part_at(self._progress(ctx)).rollout(examples, ctx)

    # --- checkpointing: stages with state (e.g. a replay buffer) are saved and restored ------
    def state_dict(self) -> dict:
        return {
            str(i): p.state_dict()
            for i, (_, p) in enumerate(self.stages)
            if hasattr(p, "state_dict")
        }

    def load_state_dict(self, state: dict) -> None:
        for i, (_, p) in enumerate(self.stages):
            if str(i) in state and hasattr(p, "load_state_dict"):
                p.load_state_dict(state[str(i)])

    def describe(self) -> str:
        parts, lo = [], 0.0
        for until, part in self.stages:
            parts.append(f"[{lo:.0%}–{until:.0%}) {part.describe()}")
            lo = until
        return "by progress: " + "; ".join(parts)


@dataclass(frozen=True)
class ByWriter:
    """A signal chosen by who wrote each row: `rollout.row_writers` when the rows of a batch
    have different writers (a `Paired` rollout), else `rollout.writer` for the whole batch.

    Each signal runs on the tokens of its own rows only (a sub-rollout), so per-row
    signals see consistent row indices; the values are put back in token order.
    """

    parts: tuple  # ((writer, signal), ...)

    @property
    def requires(self) -> frozenset:
        """Every teacher output some writer's signal needs (the union)."""
        return frozenset().union(*(requirements(s) for _, s in self.parts))

    def labelled_parts(self) -> tuple:
        return tuple((f"writer {w!r}", sig) for w, sig in self.parts)

    def signal_for(self, writer: str):
        for w, sig in self.parts:
            if w == writer:
                return sig
        raise ConfigError(
            f"ByWriter: no signal for completions written by {writer!r}; "
            f"have {', '.join(w for w, _ in self.parts)}"
        )

    def __call__(self, student, teacher, ctx):
        rollout = ctx.rollout
        if not rollout.row_writers:
            return self.signal_for(rollout.writer)(student, teacher, ctx)
        writers = rollout.row_writers
        pieces = []  # (token index, values)
        for writer in dict.fromkeys(writers):  # each writer once, in order of appearance
            signal = self.signal_for(writer)
            rows = [b for b, w in enumerate(writers) if w == writer]
            row_map_B = torch.full((len(writers),), -1, dtype=torch.long)
            row_map_B[rows] = torch.arange(len(rows))
            row_map_B = row_map_B.to(student.row_index_N.device)
            new_row_N = row_map_B[student.row_index_N]
            index_N = (new_row_N >= 0).nonzero()[:, 0]
            sub_ctx = replace(ctx, rollout=rollout.take_rows(rows))
            values = signal(
                student.take(index_N, new_row_N[index_N]), teacher.take(index_N), sub_ctx
            )
            pieces.append((index_N, values))
        dtype = pieces[0][1].dtype
        for _, values in pieces[1:]:
            dtype = torch.promote_types(dtype, values.dtype)
        out_N = torch.zeros(student.row_index_N.shape[0], dtype=dtype, device=pieces[0][1].device)
        for index_N, values in pieces:
            out_N = out_N.index_put((index_N,), values.to(dtype))
        return out_N

    def describe(self) -> str:
        return "by writer: " + "; ".join(f"{w}: {s.describe()}" for w, s in self.parts)


@dataclass(frozen=True)
class Paired:
    """Every source writes one completion per prompt; the rollout holds them all.

    For B prompts and sources (s_1, ..., s_k) the rollout has k·B rows: rows [0, B) written
    by s_1, [B, 2B) by s_2, and so on (`Rollout.row_writers` names each row's writer), so a
    `ByWriter` signal can pair a loss on the teacher's response with another on the
    student's response to the same prompt (DistiLLM-2).
    """

    sources: tuple  # prefix sources, e.g. (teacher(), student())

    def __post_init__(self):
        if not self.sources:
            raise ConfigError("Paired: needs at least one prefix source")

    @property
    def needs_completions(self) -> bool:
        return any(getattr(p, "needs_completions", False) for p in self.sources)

    @property
    def needs_teacher_model(self) -> bool:
        return any(getattr(p, "needs_teacher_model", False) for p in self.sources)

    def rollout(self, examples, ctx):
        prompts, completions, writers, answers = [], [], [], []
        info: dict = {}
        for source in self.sources:
            ro = source.rollout(examples, ctx)
            if ro.token_weight_BT is not None:
                raise ConfigError(
                    f"Paired: source {source.describe()!r} returns sampler token weights, "
                    "which a paired rollout cannot carry; use sources without them"
                )
            mask_BT = ro.completion_mask_BT.bool()
            for b in range(ro.input_ids_BL.shape[0]):
                prompt_ids = ro.input_ids_BL[b, : ro.prompt_len][
                    ro.attention_mask_BL[b, : ro.prompt_len].bool()
                ]
                prompts.append(prompt_ids.tolist())
                completions.append(ro.completion_ids_BT[b][mask_BT[b]].tolist())
                writers.append(ro.writer_of_row(b))
            answers += list(ro.answers) if ro.answers else [None] * ro.input_ids_BL.shape[0]
            info.update(ro.info)
        merged = make_rollout(prompts, completions, ctx.pad_id, "paired", answers, info)
        merged.info["student_share"] = writers.count("student") / max(1, len(writers))
        return replace(merged, row_writers=tuple(writers))

    def describe(self) -> str:
        return "paired: " + " and ".join(p.describe() for p in self.sources) + " on each prompt"


def two_stage_kl(split: float = 0.5, temperature: float = 1.0) -> ByProgress:
    """PACED's divergence schedule: KL(p_teacher ‖ q_student), then KL(q_student ‖ p_teacher).

    Args:
      split: training progress in (0, 1) at which the signal switches to reverse KL.
      temperature: τ for both stages.

    Returns:
      a `ByProgress` signal.
    """
    if not 0.0 < split < 1.0:
        raise ConfigError(f"two_stage_kl: split must be in (0, 1), got {split}")
    return ByProgress(
        (
            (split, Divergence("forward_kl", {}, temperature)),
            (1.0, Divergence("reverse_kl", {}, temperature)),
        )
    )


def prefix_source(name: str = "student", lmbda: float = 0.5):
    """A prefix source by name: "student" (on-policy), "dataset", "teacher", or "mix".

    Args:
      name: one of `PREFIX_SOURCES`.
      lmbda: for "mix", the probability that the student writes a batch (GKD's λ); the
        other batches use the dataset's completions.
    """
    if name == "student":
        return student()
    if name == "dataset":
        return dataset()
    if name == "teacher":
        return teacher()
    if name == "mix":
        return mix(student=lmbda, other="dataset")
    raise ConfigError(f"prefixes must be one of {', '.join(PREFIX_SOURCES)}; got {name!r}")
