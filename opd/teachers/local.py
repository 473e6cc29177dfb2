"""Local white-box teacher access.

`FullLogits` runs the teacher (no gradients) on the rollout and returns its final hidden
states at the N counted completion positions together with its lm_head weight, so the loss
can form teacher logits chunk by chunk (`opd.losses.chunked_divergence`) without ever holding
an (N, V) tensor. Prompt and padding rows are dropped before the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from opd.errors import ConfigError
from opd.models import decoder_and_head
from opd.precision import autocast_rows
from opd.teachers.base import as_teacher, teacher_model
from opd.teachers.ensemble import TeacherEnsemble
from opd.types import Rollout, TeacherScores, completion_rows


class TeacherAccess(Protocol):
    """A way of asking the teacher about a rollout.

    `provides`: what the scores contain (the signals' `requires` are checked against it);
    `needs`: what it asks of the teacher (checked against `Teacher.provides`, see
    `opd.teachers.base.check_teacher_serves`). `teacher` is a `Teacher` or a bare model.
    """

    provides: frozenset  # what the scores contain, e.g. {"full_logits"}
    needs: frozenset  # what the teacher must provide, e.g. {"full_logits"}

    def score(self, teacher, rollout: Rollout, vocab_size: int) -> TeacherScores: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class FullLogits:
    """White-box access: the teacher's full next-token distribution at every position."""

    provides: frozenset = frozenset({"full_logits", "topk_logprobs", "token_logprobs"})
    ensemble: bool = False  # True: insist on several teachers (model.teacher=A,B)

    needs: frozenset = frozenset({"full_logits"})  # what it asks of the teacher

    def score(self, teacher, rollout: Rollout, vocab_size: int) -> TeacherScores:
        model = teacher_model(teacher)
        if self.ensemble and not isinstance(model, TeacherEnsemble):
            raise ConfigError(
                "this method distills from a teacher ensemble: name several teachers, "
                "e.g. model.teacher=PATH_A,PATH_B (model.teacher_weights=0.5,0.5)"
            )
        return as_teacher(teacher).rows(rollout, vocab_size)

    def describe(self) -> str:
        if self.ensemble:
            return "full logits of every teacher in an ensemble (mixture p = Σ w_k p_k)"
        return "full logits (white-box teacher)"


@torch.no_grad()
def full_logit_rows(teacher: torch.nn.Module, rollout: Rollout, vocab_size: int) -> TeacherScores:
    """A local model's (or ensemble's) final hidden rows at the counted tokens + its head."""
    if isinstance(teacher, TeacherEnsemble):
        members = tuple(full_logit_rows(m, rollout, vocab_size) for m in teacher.members)
        return TeacherScores(members=members, member_weights=tuple(teacher.weights))
    decoder, head_VD, _bias = decoder_and_head(teacher, verify=False)
    device = head_VD.device
    hidden_BLD = decoder(rollout.input_ids_BL.to(device), rollout.attention_mask_BL.to(device))
    rows_ND = autocast_rows(completion_rows(hidden_BLD, rollout))  # bf16 with train.bf16_logits
    head_VD = head_VD[:vocab_size].detach().to(rows_ND.dtype)
    return TeacherScores(hidden_ND=rows_ND.detach(), head_VD=head_VD)
