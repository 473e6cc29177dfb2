"""What a teacher is: an object that says what it can return, not necessarily an `nn.Module`.

    Teacher.provides ⊆ {"full_logits", "topk_logprobs", "token_logprobs", "text"}

    full_logits     rows(rollout, vocab_size) -> TeacherScores with hidden_ND / head_VD (or
                    the members of an ensemble): the whole next-token distribution
    topk_logprobs   logprobs(rollout, k ≥ 1, τ, vocab_size): the k best log-probabilities
                    per counted token plus a tail bucket (see `opd.teachers.topk`)
    token_logprobs  logprobs(rollout, 0, τ, vocab_size): log p_teacher(y_t) of the written
                    tokens only
    text            generate(...): the teacher writes completions (a local model)

Three kinds implement it: `LocalTeacher` (a model in this process, also an ensemble of them,
every output), `opd.teachers.served.ServedTeacher` (a vLLM / SGLang / `opd serve-teacher`
endpoint: top-k and token log-probs) and, later, self-teachers (views of the student).
An access mode (`FullLogits`, `TopK`, `SampledLogprobs`) asks the teacher for what its method
needs; `check_teacher_serves` refuses, before training, a method whose access mode or signal
needs an output the teacher cannot give, naming both. A bare `nn.Module` passed where a teacher
is expected is wrapped by `as_teacher`, so code written for local models keeps working.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from opd.errors import ConfigError
from opd.types import Rollout, TeacherScores

OUTPUTS = ("full_logits", "topk_logprobs", "token_logprobs", "text")
"""Everything a teacher can be asked for, from the richest to the narrowest."""


@runtime_checkable
class Teacher(Protocol):
    """A teacher: what it provides, how it scores a rollout, and a one-line description."""

    provides: frozenset

    def logprobs(
        self, rollout: Rollout, k: int, temperature: float, vocab_size: int
    ) -> TeacherScores: ...

    def describe(self) -> str: ...


class LocalTeacher:
    """A teacher model (or `TeacherEnsemble`) in this process: every output.

    An ensemble gives only full logits (a mixture's top-k would need the mixture's whole
    distribution per row, which the full-logit path already forms chunk by chunk).
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int = 512):
        self.model = model
        self.chunk_size = chunk_size
        ensemble = hasattr(model, "members")
        self.provides = frozenset({"full_logits"} if ensemble else OUTPUTS)

    def rows(self, rollout: Rollout, vocab_size: int) -> TeacherScores:
        from opd.teachers.local import full_logit_rows

        return full_logit_rows(self.model, rollout, vocab_size)

    @torch.no_grad()
    def logprobs(
        self, rollout: Rollout, k: int, temperature: float, vocab_size: int
    ) -> TeacherScores:
        from opd.losses import chunked_token_logprobs, chunked_topk
        from opd.teachers.topk import TAIL_ID, completion_targets, with_tail

        self._need("topk_logprobs" if k else "token_logprobs")
        full = self.rows(rollout, vocab_size)
        if k > full.head_VD.shape[0]:
            raise ValueError(f"TopK: k = {k} exceeds the vocabulary V = {full.head_VD.shape[0]}")
        targets_N = completion_targets(rollout, full.head_VD.device)
        if not k:
            token_logprobs_N = chunked_token_logprobs(
                full.hidden_ND, full.head_VD, targets_N, temperature, self.chunk_size
            )
            return TeacherScores(token_logprobs_N=token_logprobs_N)
        # one pass over the vocabulary for the top-k and the written tokens' log-probs
        logprobs_NK, ids_NK, token_logprobs_N = chunked_topk(
            full.hidden_ND, full.head_VD, k, temperature, self.chunk_size, target_ids=targets_N
        )
        tail_ids_N1 = torch.full_like(ids_NK[:, :1], TAIL_ID)
        return TeacherScores(
            topk_ids_NK=torch.cat([ids_NK, tail_ids_N1], dim=-1),
            topk_logprobs_NK=with_tail(logprobs_NK),
            token_logprobs_N=token_logprobs_N,
        )

    def _need(self, output: str) -> None:
        if output not in self.provides:
            raise ConfigError(
                f"{self.describe()} cannot give {output} (it gives: "
                f"{', '.join(sorted(self.provides))})"
            )

    def describe(self) -> str:
        if hasattr(self.model, "members"):
            return f"local ensemble of {len(self.model.members)} teachers"
        return "local teacher"


def as_teacher(teacher) -> Teacher:
    """`teacher` as a `Teacher`: a bare `nn.Module` (or ensemble) is wrapped in `LocalTeacher`."""
    if isinstance(teacher, torch.nn.Module):
        return LocalTeacher(teacher)
    if teacher is None or not hasattr(teacher, "provides"):
        raise ConfigError(
            f"not a teacher: {type(teacher).__name__} (expected an nn.Module, or "
            "an object with `provides` and `logprobs`, see opd.teachers.base)"
        )
    return teacher


def teacher_model(teacher) -> torch.nn.Module | None:
    """The local model behind `teacher`, or None for a teacher that is not in this process."""
    if isinstance(teacher, torch.nn.Module):
        return teacher
    model = getattr(teacher, "model", None)
    return model if isinstance(model, torch.nn.Module) else None


def method_needs(method) -> dict[str, str]:
    """The teacher outputs `method` needs, each with the part that needs it."""
    needs = {}
    if getattr(method.prefixes, "needs_teacher_model", False):  # the teacher writes
        needs["text"] = f"prefix source '{method.prefixes.describe()}'"
    access = method.teacher
    for output in sorted(getattr(access, "needs", access.provides)):
        needs.setdefault(output, f"teacher access '{access.describe()}'")
    return needs


def check_teacher_serves(method, teacher) -> None:
    """Refuse, before training, a method that needs an output the teacher cannot give (or,
    through a part's `check_teacher(teacher)`, a kind of teacher that part cannot use)."""
    for part in (method.prompts, method.prefixes):
        check = getattr(part, "check_teacher", None)
        if callable(check):
            check(teacher)  # e.g. lion's default writer needs a local teacher model
    t = as_teacher(teacher)
    k = getattr(method.teacher, "k", 0)
    if k and hasattr(t, "check_k"):
        t.check_k(k)  # e.g. a vLLM server started with a smaller --max-logprobs
    for output, who in method_needs(method).items():
        if output not in t.provides:
            raise ConfigError(
                f"the {who} needs {output}, which the teacher ({t.describe()}) cannot give "
                f"(it gives: {', '.join(o for o in OUTPUTS if o in t.provides)}); choose a "
                "recipe whose access mode it serves (`opd recipes` lists them)"
            )
