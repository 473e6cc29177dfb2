"""The data that flows through the loop: rollouts and teacher scores.

Layout of a rollout (B sequences): prompts are left-padded to a common length P, completions
are right-padded to a common length T, so column P is the first completion token of every
row. The logits that predict completion token t sit at sequence position P - 1 + t.

    input_ids_BL      [pad pad p p p | c c c pad]     L = P + T
    completion_mask_BT               [ 1 1 1  0 ]     which completion tokens count

Only the completion tokens marked in `completion_mask_BT` are ever projected through an
`lm_head` (the "rows" of the loss, N = completion_mask_BT.sum()).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Rollout:
    """A batch of prompts and the completions some prefix source wrote for them.

    Attributes:
      input_ids_BL: (B, P + T) prompt (left-padded) followed by completion (right-padded).
      attention_mask_BL: (B, P + T) 1 on real tokens, 0 on padding.
      prompt_len: P, the padded prompt length; completion token t is at column P + t.
      completion_mask_BT: (B, T) 1 where a completion token counts in the loss.
      writer: who wrote the completions: "student", "teacher", "dataset", or a mix label.
      token_weight_BT: optional (B, T) per-token weights from the sampler (for example
        importance weights of a mixed sampler); None means all ones.
      answers: the reference answers of the prompts (or None), for verifiers.
      info: free-form numbers the prefix source wants logged (e.g. share of student tokens).
      row_writers: who wrote each row, when the rows have different writers (a paired
        rollout: the teacher's and the student's response to the same prompt); () means
        every row was written by `writer`.
      raw_prompts: [crosstok] each row's prompt before the chat template
        (`opd.data.Example.raw_prompt`: messages as ((key, value), ...) pairs, or the plain
        prompt string; None for a row without one), so a teacher with another tokenizer
        renders it with its own template; () = none known.
      teacher_prompts: [self-distillation] per row, the prompt ids a self-teacher sees
        instead of the row's prompt (privileged context added, `opd.selfdistill`); () means
        the teacher sees the student's prompt.
    """

    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    prompt_len: int
    completion_mask_BT: torch.Tensor
    writer: str
    token_weight_BT: torch.Tensor | None = None
    answers: tuple = ()
    info: dict = field(default_factory=dict)
    row_writers: tuple = ()
    raw_prompts: tuple = ()  # [crosstok] see opd.crosstok.access
    teacher_prompts: tuple = ()

    def writer_of_row(self, b: int) -> str:
        return self.row_writers[b] if self.row_writers else self.writer

    def take_rows(self, rows: list[int]) -> Rollout:
        """The rollout restricted to batch rows `rows` (in that order); `info` is shared."""
        index = torch.as_tensor(rows, dtype=torch.long)
        weight = self.token_weight_BT
        return Rollout(
            input_ids_BL=self.input_ids_BL[index],
            attention_mask_BL=self.attention_mask_BL[index],
            prompt_len=self.prompt_len,
            completion_mask_BT=self.completion_mask_BT[index],
            writer=self.writer_of_row(rows[0]) if rows else self.writer,
            token_weight_BT=None if weight is None else weight[index],
            answers=tuple(self.answers[b] for b in rows) if self.answers else (),
            info=self.info,
            row_writers=tuple(self.row_writers[b] for b in rows) if self.row_writers else (),
            raw_prompts=tuple(self.raw_prompts[b] for b in rows) if self.raw_prompts else (),
            teacher_prompts=(
                tuple(self.teacher_prompts[b] for b in rows) if self.teacher_prompts else ()
            ),
        )

    @property
    def completion_ids_BT(self) -> torch.Tensor:
        return self.input_ids_BL[:, self.prompt_len :]

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask_BT.sum())

    def completion_lengths(self) -> torch.Tensor:
        """(B,) number of counted completion tokens in each row."""
        return self.completion_mask_BT.sum(dim=1)


@dataclass(frozen=True)
class StudentRows:
    """The student's view of the N counted completion tokens.

    Attributes:
      hidden_ND: (N, D_s) final hidden states at the positions that predict each token.
      head_VD: (V, D_s) the student's lm_head weight (sliced to the shared vocabulary).
      target_ids_N: (N,) the completion tokens themselves.
      row_index_N: (N,) which batch row each token belongs to.
    """

    hidden_ND: torch.Tensor
    head_VD: torch.Tensor
    target_ids_N: torch.Tensor
    row_index_N: torch.Tensor

    def take(self, index_N: torch.Tensor, row_index_N: torch.Tensor) -> StudentRows:
        """The tokens `index_N` only, with their rows renumbered to `row_index_N`."""
        return StudentRows(
            self.hidden_ND[index_N], self.head_VD, self.target_ids_N[index_N], row_index_N
        )


@dataclass(frozen=True)
class TeacherScores:
    """What a teacher access mode returns for the N counted tokens; unused fields are None.

    Attributes:
      hidden_ND, head_VD: full white-box access: teacher logits are hidden_ND @ head_VD.T.
      topk_ids_NK, topk_logprobs_NK: top-k access (log-probs of the k best tokens).
      token_logprobs_N: sampled access: log p_teacher(y_t) of the tokens actually written.
      members, member_weights: a teacher ensemble: one full-logit TeacherScores per member
        and the mixture weights w_k (p = Σ_k w_k p_k); hidden_ND/head_VD are then None.
      span_index_N, span_teacher_logprobs_G: [crosstok] a teacher with another tokenizer:
        the aligned span g of each counted student token (−1 = masked) and, per span,
        Σ log p_teacher over the teacher's tokens of that span (`opd.crosstok.access`).
    """

    hidden_ND: torch.Tensor | None = None
    head_VD: torch.Tensor | None = None
    topk_ids_NK: torch.Tensor | None = None
    topk_logprobs_NK: torch.Tensor | None = None
    token_logprobs_N: torch.Tensor | None = None
    members: tuple = ()
    member_weights: tuple = ()
    span_index_N: torch.Tensor | None = None  # [crosstok]
    span_teacher_logprobs_G: torch.Tensor | None = None  # [crosstok]

    @property
    def has_full_logits(self) -> bool:
        return self.hidden_ND is not None or bool(self.members)

    def take(self, index_N: torch.Tensor) -> TeacherScores:
        """The scores of tokens `index_N` only (the heads are shared)."""

        def rows(x):
            return None if x is None else x[index_N.to(x.device)]

        return TeacherScores(
            hidden_ND=rows(self.hidden_ND),
            head_VD=self.head_VD,
            topk_ids_NK=rows(self.topk_ids_NK),
            topk_logprobs_NK=rows(self.topk_logprobs_NK),
            token_logprobs_N=rows(self.token_logprobs_N),
            members=tuple(m.take(index_N) for m in self.members),
            member_weights=self.member_weights,
            span_index_N=rows(self.span_index_N),  # [crosstok] spans keep their numbers
            span_teacher_logprobs_G=self.span_teacher_logprobs_G,
        )


def completion_rows(hidden_BLD: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """Select the hidden states that predict the counted completion tokens.

    Args:
      hidden_BLD: (B, P + T, D) final hidden states of a model run on rollout.input_ids_BL.
      rollout: the rollout.

    Returns:
      (N, D) rows in row-major order of `completion_mask_BT`, so they line up with
      `rollout.completion_ids_BT[mask]`.
    """
    P = rollout.prompt_len
    T = rollout.completion_mask_BT.shape[1]
    predicting_BTD = hidden_BLD[:, P - 1 : P - 1 + T, :]
    return predicting_BTD[rollout.completion_mask_BT.bool()]
