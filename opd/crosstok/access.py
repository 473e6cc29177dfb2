"""Cross-tokenizer teacher access: the teacher's log-probability of each aligned span.

For every row of the student's rollout:

    prompt_T      the row's raw prompt (`Rollout.raw_prompts`: the messages or prompt string
                  before any chat template) rendered with the TEACHER's chat template; when
                  the rollout has none (prompt truncated, rollout built in code) the student's
                  prompt is decoded and re-tokenised by the teacher
    completion_T  `opd.crosstok.align.align_completion`: the teacher's tokens of the same
                  completion text, specials mapped (student end-of-turn → teacher's)
    spans g       shortest runs of student and teacher tokens over the same bytes

then a second `Rollout` in the teacher's tokenisation is scored for sampled-token log-probs
(today `opd.teachers.SampledLogprobs` on the local teacher; any teacher that returns
token log-probs serves, so local, GGUF and served teachers alike) and summed per span:

    span_teacher_logprobs_G[g] = Σ_{u ∈ g} log p_teacher(u | prompt_T, u_<)      (G,)
    span_index_N[n]            = the span of counted student token n, −1 when masked  (N,)

Spans that cannot be aligned (a student token with no bytes, text the teacher's tokenizer
does not reproduce; with the options, invalid UTF-8 and specials the teacher lacks) get no g.

Identical tokenizers (`Models.teacher_tokenizer` None, or the same vocabulary): the teacher
scores the student's own rollout and every counted token is its own span, so the numbers
are exactly `SampledLogprobs`'s (no re-tokenisation: a sampled non-canonical tokenisation is
scored as written, as `sampled_rkl` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from opd.crosstok.align import align_completion
from opd.crosstok.bytes import TokenBytes
from opd.errors import ConfigError
from opd.models import shared_vocab_size
from opd.sampling.sources import make_rollout
from opd.teachers.base import teacher_model
from opd.teachers.sampled import SampledLogprobs
from opd.types import Rollout, TeacherScores


def _as_ids(encoded) -> list[int]:
    from opd.data.encode import _as_ids as as_ids

    return as_ids(encoded)


def render_prompt(raw, tokenizer, student_text: str) -> list[int]:
    """The teacher's prompt ids for one row.

    Args:
      raw: the row's raw prompt: a sequence of {"role", "content"} messages (the student used
        its chat template), a string (plain prompt), or None.
      tokenizer: the teacher's tokenizer.
      student_text: the student's rendered prompt (used when `raw` is None).
    """
    if raw is None:
        return [int(i) for i in tokenizer(student_text, add_special_tokens=False).input_ids]
    if isinstance(raw, str):
        return [int(i) for i in tokenizer(raw, add_special_tokens=True).input_ids]
    turns = [dict(t) for t in raw]
    if getattr(tokenizer, "chat_template", None):
        return _as_ids(
            tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True)
        )
    text = "\n\n".join(t["content"] for t in turns)  # a teacher without a chat template
    return [int(i) for i in tokenizer(text, add_special_tokens=True).input_ids]


@dataclass(frozen=True)
class CrossTokenizerLogprobs:
    """Span log-probs of a teacher with its own tokenizer (see the module docstring).

    Attributes:
      chunk_size: rows per chunk when scoring a local teacher.
      mask_invalid: mask spans touching invalid UTF-8 (default: score them against the
        teacher's U+FFFD, `opd.crosstok.align`).
      literal_specials: a student special the teacher lacks is scored as its literal text
        (default) instead of masked.
    """

    chunk_size: int = 512
    mask_invalid: bool = False
    literal_specials: bool = True
    provides: frozenset = frozenset({"span_logprobs"})
    needs: frozenset = frozenset({"token_logprobs"})  # of the teacher, on its own tokens
    cross_tokenizer: ClassVar[bool] = True  # opd.build allows differing vocabularies
    _state: dict = field(default_factory=dict, compare=False, repr=False)

    def prepare(self, models) -> None:
        """Read both tokenizers from the run's `opd.build.Models` (before the first step)."""
        student_tok, teacher_tok = models.tokenizer, getattr(models, "teacher_tokenizer", None)
        same = teacher_tok is None or teacher_tok.get_vocab() == student_tok.get_vocab()
        self._state.clear()
        self._state.update(same=same, student_tok=student_tok)
        if not same:
            self._state.update(
                teacher_tok=teacher_tok,
                student=TokenBytes(student_tok),
                teacher=TokenBytes(teacher_tok),
                teacher_vocab=_teacher_vocab(models.teacher, teacher_tok),
            )

    def _prepared(self) -> dict:
        if not self._state:
            raise ConfigError(
                "cross-tokenizer teacher access: call prepare(models) first (opd distill does; "
                "in code pass Models with teacher_tokenizer set)"
            )
        return self._state

    @torch.no_grad()
    def score(self, teacher, rollout: Rollout, vocab_size: int) -> TeacherScores:
        st = self._prepared()
        sampled = SampledLogprobs(self.chunk_size)
        if st["same"]:
            logp_N = sampled.score(teacher, rollout, vocab_size).token_logprobs_N
            index_N = torch.arange(logp_N.shape[0], device=logp_N.device)
            return TeacherScores(  # token_logprobs_N too: the loop logs teacher_kl from it
                token_logprobs_N=logp_N, span_index_N=index_N, span_teacher_logprobs_G=logp_N
            )
        t_rollout, spans_per_row = self.teacher_rollout(rollout)
        logp_M = sampled.score(teacher, t_rollout, st["teacher_vocab"]).token_logprobs_N
        return span_scores(rollout, t_rollout, spans_per_row, logp_M)

    def teacher_rollout(self, rollout: Rollout) -> tuple[Rollout, list]:
        """The rollout in the teacher's tokenisation, and each row's spans."""
        st = self._prepared()
        s_tok, t_tok = st["student_tok"], st["teacher_tok"]
        ids_BT, mask_BT = rollout.completion_ids_BT, rollout.completion_mask_BT.bool()
        P = rollout.prompt_len
        prompts, comps, spans = [], [], []
        for b in range(ids_BT.shape[0]):
            raw = rollout.raw_prompts[b] if rollout.raw_prompts else None
            prompt_ids = rollout.input_ids_BL[b, :P][rollout.attention_mask_BL[b, :P].bool()]
            text = s_tok.decode(prompt_ids.tolist()) if raw is None else ""
            prompts.append(render_prompt(raw, t_tok, text))
            al = align_completion(
                ids_BT[b][mask_BT[b]].tolist(),
                st["student"],
                st["teacher"],
                self.mask_invalid,
                self.literal_specials,
            )
            comps.append(al.teacher_ids)
            spans.append(al.spans)
        pad = t_tok.pad_token_id if t_tok.pad_token_id is not None else t_tok.eos_token_id
        return make_rollout(prompts, comps, int(pad or 0), rollout.writer), spans

    def describe(self) -> str:
        return "cross-tokenizer span log-probs Σ log p_teacher over aligned byte spans"


def span_scores(rollout: Rollout, t_rollout: Rollout, spans_per_row, logp_M) -> TeacherScores:
    """TeacherScores with span_index_N (N,) and span_teacher_logprobs_G (G,) (aligned only).

    `logp_M` holds the teacher's log-probs of t_rollout's counted tokens, row-major.
    """
    n_B = rollout.completion_mask_BT.sum(1).tolist()
    m_B = t_rollout.completion_mask_BT.sum(1).tolist()
    index_N = torch.full((int(sum(n_B)),), -1, dtype=torch.long)
    t_span = torch.full((int(sum(m_B)),), -1, dtype=torch.long)
    g = n0 = m0 = 0
    for spans, n, m in zip(spans_per_row, n_B, m_B):
        for sp in spans:
            if sp.aligned:
                index_N[n0 + sp.s_start : n0 + sp.s_end] = g
                t_span[m0 + sp.t_start : m0 + sp.t_end] = g
                g += 1
        n0, m0 = n0 + int(n), m0 + int(m)
    keep = t_span >= 0
    logp_M = logp_M.detach()
    logp_G = torch.zeros(g, dtype=logp_M.dtype, device=logp_M.device)
    logp_G.index_add_(0, t_span[keep].to(logp_M.device), logp_M[keep.to(logp_M.device)])
    return TeacherScores(span_index_N=index_N, span_teacher_logprobs_G=logp_G)


def _teacher_vocab(teacher, teacher_tok) -> int:
    """Rows of the teacher's vocabulary: its head (local), or its tokenizer (served: the
    server checked that its tokenizer is this one)."""
    local = teacher_model(teacher)
    if local is None:
        return len(teacher_tok)
    return shared_vocab_size(local, teacher_tok, local, teacher_tok)
