"""The GOLD-style white-box cross-tokenizer signal and the teacher access it needs.

    student rollout ─► bytes of each student completion token (opd.crosstok.vocab_map)
                   ─► the teacher's own tokenisation of the same text (+ end-of-turn mapped)
                   ─► spans with a shared byte boundary (opd.crosstok.align.align_spans)
                   ─► one (student position, teacher position) pair per usable span
    teacher (no grad) on its tokenisation ─► hidden rows at the pairs' teacher positions
    GoldSignal: values at the pairs' student positions = opd.crosstok.uld.chunked_gold_loss

Pairs. Span g covers student tokens [s_start, s_end) and teacher tokens [t_start, t_end) of
the same bytes, so the position that predicts student token s_start and the one that
predicts teacher token t_start condition on the same text. `span_rule`:
- "first" (default): every aligned span gives the pair (s_start, t_start), whatever its
  length; the span's other student tokens get the value 0 (counted as masked tokens).
- "one_to_one": only spans with one token on each side give a pair; longer spans are
  masked (every token of them) and counted.
Unaligned spans (bytes that differ, e.g. a cut UTF-8 character) are always masked.
Counted per micro-batch with ctx.log: gold_pairs, gold_masked_spans, gold_masked_tokens
(student tokens without a value), gold_value (mean over the pairs).

The teacher's tokenisation comes from the cross-tokenizer access of `opd.crosstok.access`
(raw prompt rendered with the teacher's chat template, completion re-tokenised, end-of-turn
and other specials mapped, invalid UTF-8 scored against the teacher's U+FFFD); this module
adds the full-logit scoring and the pairing. Matches between the vocabularies:
`opd.crosstok.vocab_map`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from opd.crosstok.uld import chunked_gold_loss, gold_loss
from opd.crosstok.vocab_map import exact_matches, vocab_keys
from opd.errors import ConfigError
from opd.signals.divergence import check_divergence_spec, params_key
from opd.teachers import FullLogits
from opd.teachers.ensemble import TeacherEnsemble
from opd.types import Rollout, StudentRows, TeacherScores

SPAN_RULES = ("first", "one_to_one")


@dataclass(frozen=True)
class SpanPairScores(TeacherScores):
    """TeacherScores of `SpanLogits`: full teacher logits at P aligned position pairs.

    Attributes:
      pair_student_P: (P,) index into the N counted student tokens (the span's first token).
      pair_hidden_PE, pair_head_UE: teacher hidden rows at the paired teacher positions and
        its lm_head: teacher logits_PU = pair_hidden_PE @ pair_head_UE.T.
      match_s_M, match_t_M: the exact vocabulary matches (student id ↔ teacher id).
      spans, masked_spans, masked_tokens: counts for the logs.
    """

    pair_student_P: torch.Tensor | None = None
    pair_hidden_PE: torch.Tensor | None = None
    pair_head_UE: torch.Tensor | None = None
    match_s_M: torch.Tensor | None = None
    match_t_M: torch.Tensor | None = None
    spans: int = 0
    masked_spans: int = 0
    masked_tokens: int = 0


def span_pairs(spans, span_rule: str) -> tuple[list[tuple[int, int]], int]:
    """(pairs of (student index, teacher index), masked span count) under `span_rule`."""
    pairs, masked = [], 0
    for sp in spans:
        usable = sp.aligned and sp.s_end > sp.s_start and sp.t_end > sp.t_start
        if usable and span_rule == "one_to_one":
            usable = sp.s_end - sp.s_start == 1 and sp.t_end - sp.t_start == 1
        if usable:
            pairs.append((sp.s_start, sp.t_start))
        else:
            masked += 1
    return pairs, masked


@dataclass(frozen=True)
class _OneTokenSpan:
    """A span of one token on each side (the fields `span_pairs` reads)."""

    s_start: int
    s_end: int
    t_start: int
    t_end: int
    aligned: bool = True


def _one_token_spans(rollout: Rollout) -> list:
    """Identical tokenizers: every counted token is its own span (both sides the same)."""
    n_B = rollout.completion_mask_BT.sum(1).tolist()
    return [[_OneTokenSpan(i, i + 1, i, i + 1) for i in range(int(n))] for n in n_B]


@dataclass(frozen=True)
class SpanLogits:
    """Cross-tokenizer white-box access: teacher full logits at aligned span starts.

    The teacher's tokenisation of the rollout (prompt rendered with its own chat template,
    completion re-tokenised, specials mapped, spans) is `opd.crosstok.access.
    CrossTokenizerLogprobs.teacher_rollout`; the local teacher then runs on it for full
    logits (`FullLogits`), of which only the rows at the pairs' teacher positions are kept.
    With identical tokenizers the student's own rollout is scored and every token is a pair.

    Attributes:
      span_rule: "first" or "one_to_one" (module docstring).
    """

    span_rule: str = "first"
    provides: frozenset = frozenset({"span_full_logits"})
    needs: frozenset = frozenset({"full_logits"})  # a local white-box teacher
    cross_tokenizer: ClassVar[bool] = True  # opd.build allows differing vocabularies
    _state: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.span_rule not in SPAN_RULES:
            raise ConfigError(
                f"span_rule must be one of {', '.join(SPAN_RULES)}, got {self.span_rule!r}"
            )

    def prepare(self, models) -> None:
        """Read both tokenizers from the run's `opd.build.Models` (before the first step)."""
        s_tok = models.tokenizer
        t_tok = getattr(models, "teacher_tokenizer", None) or s_tok
        same = t_tok is s_tok or t_tok.get_vocab() == s_tok.get_vocab()
        try:
            from opd.crosstok.access import CrossTokenizerLogprobs
        except ImportError:  # a build without the cross-tokenizer access: one tokenizer only
            if not same:
                raise ConfigError(
                    "xtok_gold: a teacher with another tokenizer needs opd.crosstok.access"
                ) from None
            inner = None
        else:
            inner = CrossTokenizerLogprobs()
            inner.prepare(models)
        self._state.clear()
        self._state.update(inner=inner, same=same, student_tok=s_tok, teacher_tok=t_tok, matches={})

    def _matches(self, V: int, U: int):
        st = self._state
        if (V, U) not in st["matches"]:
            s_keys = vocab_keys(st["student_tok"], V)
            t_keys = vocab_keys(st["teacher_tok"], U)
            st["matches"][V, U] = exact_matches(s_keys, t_keys)
        return st["matches"][V, U]

    def teacher_rollout(self, rollout: Rollout) -> tuple[Rollout, list]:
        """The rollout in the teacher's tokenisation and each row's spans (the student's own
        rollout and one-token spans when the tokenizers are the same)."""
        if not self._state:
            raise ConfigError(
                "cross-tokenizer teacher access: call prepare(models) first (opd distill does; "
                "in code pass Models with teacher_tokenizer set)"
            )
        if self._state["same"]:
            return rollout, _one_token_spans(rollout)
        return self._state["inner"].teacher_rollout(rollout)

    @torch.no_grad()
    def score(self, teacher, rollout: Rollout, vocab_size: int) -> SpanPairScores:
        if isinstance(teacher, TeacherEnsemble):
            raise ConfigError(
                "xtok_gold distills from one teacher, got an ensemble of "
                f"{len(teacher.members)}; name one model.teacher"
            )
        t_rollout, spans_per_row = self.teacher_rollout(rollout)
        same = self._state["same"]
        U = vocab_size if same else self._state["inner"]._prepared()["teacher_vocab"]
        full = FullLogits().score(teacher, t_rollout, U)
        n_B = rollout.completion_mask_BT.sum(1).tolist()
        m_B = t_rollout.completion_mask_BT.sum(1).tolist()
        pairs_s, pairs_t, n_spans, masked_spans, masked_tokens = [], [], 0, 0, 0
        s_off = t_off = 0
        for spans, n, m in zip(spans_per_row, n_B, m_B):
            pairs, masked = span_pairs(spans, self.span_rule)
            pairs_s += [s_off + s for s, _ in pairs]
            pairs_t += [t_off + t for _, t in pairs]
            n_spans += len(spans)
            masked_spans += masked
            masked_tokens += int(n) - len(pairs)
            s_off, t_off = s_off + int(n), t_off + int(m)
        if same:
            ms = mt = torch.arange(vocab_size)
        else:
            ms, mt = self._matches(vocab_size, full.head_VD.shape[0])
        index_t = torch.tensor(pairs_t, dtype=torch.long, device=full.hidden_ND.device)
        return SpanPairScores(
            pair_student_P=torch.tensor(pairs_s, dtype=torch.long),
            pair_hidden_PE=full.hidden_ND[index_t],
            pair_head_UE=full.head_VD,
            match_s_M=ms,
            match_t_M=mt,
            spans=n_spans,
            masked_spans=masked_spans,
            masked_tokens=masked_tokens,
        )

    def describe(self) -> str:
        return f"teacher full logits at aligned span starts (cross-tokenizer, {self.span_rule})"


@dataclass(frozen=True)
class GoldSignal:
    """GOLD-style values: matched-token divergence + ULD sorted L1 at aligned span starts.

    Attributes:
      temperature: τ for both models' softmax.
      matched_weight, uld_weight: weights of the two parts (opd.crosstok.uld).
      divergence, params: the opd divergence on the matched tokens (default reverse_kl).
    """

    temperature: float = 1.0
    matched_weight: float = 1.0
    uld_weight: float = 1.0
    divergence: str = "reverse_kl"
    params: dict = field(default_factory=dict)
    requires: ClassVar[frozenset] = frozenset({"span_full_logits"})
    logs: ClassVar[frozenset] = frozenset(
        {"gold_pairs", "gold_masked_spans", "gold_masked_tokens", "gold_value"}
    )

    def __post_init__(self):
        check_divergence_spec(self.divergence, self.params, self.temperature, "xtok_gold")
        for name in ("matched_weight", "uld_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    def __hash__(self):
        return hash(
            (
                self.temperature,
                self.matched_weight,
                self.uld_weight,
                self.divergence,
                params_key(self.params),
            )
        )

    def __call__(self, student: StudentRows, teacher: SpanPairScores, ctx) -> torch.Tensor:
        h_s = student.hidden_ND
        device = h_s.device
        idx = teacher.pair_student_P.to(device)
        t_hidden = teacher.pair_hidden_PE.to(device=device, dtype=h_s.dtype)
        t_head = teacher.pair_head_UE.to(device=device, dtype=h_s.dtype)
        if not bool(torch.isfinite(t_hidden).all()):
            from opd.step import NonFiniteError  # the loop's check sees only its own fields

            raise NonFiniteError(
                f"step {ctx.step + 1}: the teacher's output is not finite (NaN/inf at the "
                "aligned span starts); the student was not updated at this step"
            )
        ms, mt = teacher.match_s_M.to(device), teacher.match_t_M.to(device)
        kw = dict(
            temperature=self.temperature,
            matched_weight=self.matched_weight,
            uld_weight=self.uld_weight,
            divergence=self.divergence,
            **self.params,
        )
        if ctx.materialize:
            values_P = gold_loss(h_s[idx] @ student.head_VD.T, t_hidden @ t_head.T, ms, mt, **kw)
        else:
            values_P = chunked_gold_loss(
                h_s[idx],
                student.head_VD,
                t_hidden,
                t_head,
                ms,
                mt,
                chunk_size=ctx.chunk_size,
                **kw,
            )
        values_N = values_P.new_zeros(h_s.shape[0]).index_copy(0, idx, values_P)
        ctx.log("gold_pairs", idx.numel())
        ctx.log("gold_masked_spans", teacher.masked_spans)
        ctx.log("gold_masked_tokens", teacher.masked_tokens)
        ctx.log("gold_value", float(values_P.detach().mean()) if idx.numel() else 0.0)
        return values_N

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        div = f"{self.divergence}({args})"
        t = f", temperature={self.temperature}" if self.temperature != 1.0 else ""
        return (
            f"gold({self.matched_weight} × {div} on exact vocabulary matches + "
            f"{self.uld_weight} × ULD sorted L1 on the rest{t})"
        )
