"""SPIN's parts: the opponent (the previous iterate p_t), its samples, and the self-play loss.

Chen, Deng, Yuan, Ji & Gu, "Self-Play Fine-Tuning Converts Weak Language Models to Strong
Language Models", ICML 2024 (arXiv 2401.01335). For a prompt x the chosen response y_w is
the dataset's completion and the rejected response y_l is a sample of the opponent p_t, a
frozen copy of the student as it was at the start of iteration t. With sequence log-ratios

    r(y) = Σ_t log q_θ(y_t | x, y_<t) − Σ_t log p_t(y_t | x, y_<t)

the per-pair loss is the logistic loss of the margin

    h = λ·(r(y_w) − r(y_l)),     L = ℓ(h) = log(1 + exp(−h)) = −log σ(h)

(λ is the paper's β of its DPO-style implementation, 0.1 by default). At the start of each
iteration p_t = q_θ, so h = 0 and L = log 2.

    Opponent        the teacher access: a frozen copy of the student, made in `prepare`,
                    refreshed (p_t ← q_θ, weights copied in place) after every
                    `iteration_steps` optimizer steps; provides the opponent's log-probs
                    log p_t(y_t) of every counted token (both rows of each pair); the
                    weights of its trained parameters (all, or a LoRA student's adapters),
                    its step count and iteration number are checkpointed, so a resumed run
                    continues with the same opponent
    OpponentSamples the prefix source of the rejected rows: the opponent samples y_l
    SPINLoss        the signal: every token of both rows of pair b carries L_b, so the
                    loop's "sequence_mean" reduction gives the mean of L_b over the pairs
                    (a row without tokens drops out of that mean), with the gradient of L_b

Rows come from `Paired((dataset(), OpponentSamples(opponent)))`: rows [0, B) the chosen
(writer "dataset"), rows [B, 2B) the rejected (writer "opponent").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from opd.errors import ConfigError
from opd.sampling.sources import answers_of, make_rollout, prompts_of
from opd.signals.tokens import student_token_logprobs
from opd.teachers.base import LocalTeacher
from opd.types import Rollout, TeacherScores


def spin_pair_loss(
    chosen_ratio_P: Tensor, rejected_ratio_P: Tensor, lam: float = 0.1
) -> tuple[Tensor, Tensor]:
    """(P,) losses −log σ(λ·(r_w − r_l)) of P pairs and (P,) margins h (module doc)."""
    h_P = lam * (chosen_ratio_P - rejected_ratio_P)
    return -F.logsigmoid(h_P), h_P


class Opponent:
    """The previous iterate p_t (module doc): a teacher access giving log p_t(y_t)."""

    provides = frozenset({"token_logprobs"})
    needs = frozenset()  # nothing is asked of models.teacher

    def __init__(self, iteration_steps: int = 100, chunk_size: int = 512):
        if iteration_steps < 1:
            raise ConfigError(f"iteration_steps must be >= 1, got {iteration_steps}")
        self.iteration_steps, self.chunk_size = iteration_steps, chunk_size
        self.model: torch.nn.Module | None = None
        self.student: torch.nn.Module | None = None
        self.steps = 0  # optimizer steps taken so far
        self.iteration = 0  # refreshes so far: the opponent is iterate t = `iteration`

    def prepare(self, models) -> None:
        """Copy the initial student once (before a checkpoint is restored)."""
        self.student = models.student
        self.model = copy.deepcopy(models.student).eval()
        self.model.requires_grad_(False)
        self.steps = self.iteration = 0

    def ready(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError("Opponent.prepare(models) was not called")
        return self.model

    def score(self, teacher, rollout: Rollout, vocab_size: int) -> TeacherScores:
        local = LocalTeacher(self.ready(), self.chunk_size)
        scores = local.logprobs(rollout, 0, 1.0, vocab_size)
        return TeacherScores(token_logprobs_N=scores.token_logprobs_N)

    def _trained(self) -> dict:
        """The opponent's parameters whose student twin trains (requires_grad): the only
        ones that can differ from the student's (a LoRA student's frozen base never does)."""
        student = dict(self.student.named_parameters())
        return {n: p for n, p in self.ready().named_parameters() if student[n].requires_grad}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Count the step; after every `iteration_steps` steps p_t ← q_θ (a new iteration)."""
        self.steps += 1
        if self.steps % self.iteration_steps == 0:
            student = dict(self.student.named_parameters())
            for name, p in self._trained().items():
                p.copy_(student[name].detach())
            self.iteration += 1

    def state_dict(self) -> dict:
        """Step count, iteration and the trained parameters' weights (tensors: written to the
        checkpoint's components.safetensors)."""
        weights = {n: p.detach() for n, p in self._trained().items()}
        return {"steps": self.steps, "iteration": self.iteration, "weights": weights}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.iteration = int(state["steps"]), int(state["iteration"])
        own = dict(self.ready().named_parameters())
        with torch.no_grad():
            for name, value in state["weights"].items():
                own[name].copy_(value.to(own[name].device, own[name].dtype))

    def describe(self) -> str:
        return (
            "sampled-token log-probs of the opponent p_t (a frozen copy of the student, "
            f"refreshed every {self.iteration_steps} steps)"
        )


@dataclass(frozen=True, eq=False)
class OpponentSamples:
    """The opponent samples each rejected completion y_l ~ p_t(·|x)."""

    opponent: Opponent
    needs_completions: ClassVar[bool] = False
    needs_teacher_model: ClassVar[bool] = False

    def rollout(self, examples, ctx) -> Rollout:
        comps = ctx.generate(self.opponent.ready(), prompts_of(examples))
        info = {"spin_iteration": float(self.opponent.iteration)}
        return make_rollout(
            prompts_of(examples), comps, ctx.pad_id, "opponent", answers_of(examples), info
        )

    def describe(self) -> str:
        return "opponent: the previous iterate p_t samples y_l"


@dataclass(frozen=True)
class SPINLoss:
    """SPIN's logistic loss on a `Paired((dataset(), OpponentSamples(...)))` rollout."""

    lam: float = 0.1
    chosen: str = "dataset"
    rejected: str = "opponent"
    requires: ClassVar[frozenset] = frozenset({"token_logprobs"})
    logs: ClassVar[frozenset] = frozenset({"spin_margin", "spin_win_rate"})

    def __post_init__(self):
        if not self.lam > 0:
            raise ConfigError(f"SPIN: lam (λ) must be > 0, got {self.lam}")

    def _pairs(self, rollout) -> tuple[list[int], list[int]]:
        writers = getattr(rollout, "row_writers", ()) or ()
        chosen = [b for b, w in enumerate(writers) if w == self.chosen]
        rejected = [b for b, w in enumerate(writers) if w == self.rejected]
        if not chosen or len(chosen) != len(rejected):
            raise ConfigError(
                f"SPIN needs a paired rollout with one {self.chosen!r} and one "
                f"{self.rejected!r} row per prompt; got writers {sorted(set(writers)) or 'none'}"
            )
        return chosen, rejected

    def __call__(self, student, teacher, ctx) -> Tensor:
        chosen, rejected = self._pairs(ctx.rollout)
        logq_N = student_token_logprobs(student, ctx)
        ratio_N = logq_N - teacher.token_logprobs_N.to(logq_N.device, logq_N.dtype).detach()
        B, row_N = len(ctx.rollout.row_writers), student.row_index_N
        ratio_B = torch.zeros(B, dtype=logq_N.dtype, device=logq_N.device).index_add(
            0, row_N, ratio_N
        )
        w_P = torch.tensor(chosen, device=logq_N.device)
        l_P = torch.tensor(rejected, device=logq_N.device)
        loss_P, h_P = spin_pair_loss(ratio_B[w_P], ratio_B[l_P], self.lam)
        pair_of_row_B = torch.zeros(B, dtype=torch.long, device=logq_N.device)
        pair_of_row_B[w_P] = torch.arange(len(chosen), device=logq_N.device)
        pair_of_row_B[l_P] = torch.arange(len(rejected), device=logq_N.device)
        ctx.log("spin_margin", h_P.detach().mean())
        ctx.log("spin_win_rate", (h_P.detach() > 0).to(h_P.dtype).mean())
        return loss_P[pair_of_row_B[row_N]]

    def describe(self) -> str:
        return (
            f"SPIN: −log σ({self.lam}·(r(y_{self.chosen}) − r(y_{self.rejected}))), "
            "r(y) = Σ_t log q_θ(y_t) − Σ_t log p_t(y_t)"
        )
