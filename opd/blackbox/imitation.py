"""Imitation of the teacher's text: the student's negative log-likelihood of written tokens.

    values_t = −log q_student(y_t | x, y_<t)          on every counted token of the rollout

With the teacher writing y (`opd.sampling.teacher()`) this is sequence-level KD from text
alone (the teacher is never asked for a probability); `lion`'s imitation stage and `gad`'s
warm-up use it.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from opd.signals.tokens import student_token_logprobs


class TextNLL:
    """−log q_student of each written token (module doc)."""

    requires: ClassVar[frozenset] = frozenset()

    def __call__(self, student, teacher, ctx) -> Tensor:
        return -student_token_logprobs(student, ctx)

    def describe(self) -> str:
        return "−log q_student(y_t) of the written tokens (imitation of the teacher's text)"
