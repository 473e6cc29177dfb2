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

The teacher's prompt is the student's prompt decoded to text (special tokens kept, padding
dropped) and encoded by the teacher's tokenizer. Deviation: the issue asks for the raw
prompt rendered with the teacher's own chat template; that needs the raw prompt carried in
the Rollout (the cross-tokenizer access mode of `opd.crosstok` adds it); until then both
tokenizers must spell the chat's special tokens the same way (true of ChatML models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from opd.crosstok.uld import chunked_gold_loss, gold_loss
from opd.crosstok.vocab_map import exact_matches, vocab_bytes, vocab_keys
from opd.data.encode import end_of_turn_ids
from opd.errors import ConfigError, OpdError
from opd.signals.divergence import check_divergence_spec, params_key
from opd.teachers import FullLogits
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


@dataclass(eq=False)
class SpanLogits:
    """Cross-tokenizer white-box access: teacher full logits at aligned span starts.

    Attributes:
      span_rule: "first" or "one_to_one" (module docstring).
      student_tokenizer, teacher_tokenizer: set by `prepare(models)` (the teacher's from
        `models.teacher_tokenizer`, else the student's).
    """

    span_rule: str = "first"
    student_tokenizer: object = None
    teacher_tokenizer: object = None
    provides: frozenset = frozenset({"span_full_logits"})
    _tables: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.span_rule not in SPAN_RULES:
            raise ConfigError(
                f"span_rule must be one of {', '.join(SPAN_RULES)}, got {self.span_rule!r}"
            )

    def prepare(self, models) -> None:
        self.student_tokenizer = models.tokenizer
        self.teacher_tokenizer = getattr(models, "teacher_tokenizer", None) or models.tokenizer

    def _bytes(self, which: str, tok, size: int) -> list:
        key = (which, size)
        if key not in self._tables:
            self._tables[key] = vocab_bytes(tok, size)
        return self._tables[key]

    def _matches(self, V: int, U: int):
        key = ("matches", V, U)
        if key not in self._tables:
            s_keys = vocab_keys(self.student_tokenizer, V)
            t_keys = vocab_keys(self.teacher_tokenizer, U)
            self._tables[key] = exact_matches(s_keys, t_keys)
        return self._tables[key]

    def _special_to_teacher(self, s_id: int, stops: set) -> int | None:
        """The teacher id for the student's special token `s_id`: the same spelling, else the
        teacher's last end-of-turn id for a stop token, else None (masked)."""
        name = self.student_tokenizer.convert_ids_to_tokens(s_id)
        t_id = self.teacher_tokenizer.convert_tokens_to_ids(name) if name is not None else None
        if isinstance(t_id, int) and t_id != self.teacher_tokenizer.unk_token_id:
            return t_id
        ends = end_of_turn_ids(self.teacher_tokenizer) if s_id in stops else []
        return ends[-1] if ends else None

    def teacher_completion(self, comp: list[int], V: int):
        """(teacher ids, spans) for the student completion ids `comp`.

        Runs of ordinary tokens are decoded to bytes, re-encoded by the teacher and aligned
        (`align_spans`); a special token (no bytes) is its own span, paired with the
        teacher's token of the same spelling (end-of-turn mapped), masked when there is none.
        """
        from opd.crosstok.align import Span, align_spans  # the cross-tokenizer alignment

        s_bytes = self._bytes("s", self.student_tokenizer, V)
        t_size = len(self.teacher_tokenizer)
        t_bytes = self._bytes("t", self.teacher_tokenizer, t_size)
        stops = set(end_of_turn_ids(self.student_tokenizer))
        t_ids: list[int] = []
        spans: list = []
        run: list[bytes] = []  # bytes of the open run of ordinary student tokens
        s_pos = 0

        def close_run():
            nonlocal run
            if not run:
                return
            text = b"".join(run).decode("utf-8", errors="replace")
            seg = self.teacher_tokenizer.encode(text, add_special_tokens=False) if text else []
            seg_bytes = [t_bytes[i] if i < t_size and t_bytes[i] is not None else b"" for i in seg]
            s0, t0 = s_pos - len(run), len(t_ids)
            for sp in align_spans(run, seg_bytes) if seg else []:
                spans.append(
                    Span(sp.s_start + s0, sp.s_end + s0, sp.t_start + t0, sp.t_end + t0, sp.aligned)
                )
            if not seg:
                spans.append(Span(s0, s_pos, t0, t0, aligned=False))
            t_ids.extend(seg)
            run = []

        for i in comp:
            piece = s_bytes[i] if i < V else None
            if piece is not None and piece != b"":
                run.append(piece)
                s_pos += 1
                continue
            close_run()
            t_id = self._special_to_teacher(i, stops) if i < V else None
            t0 = len(t_ids)
            if t_id is None:
                spans.append(Span(s_pos, s_pos + 1, t0, t0, aligned=False))
            else:
                t_ids.append(t_id)
                spans.append(Span(s_pos, s_pos + 1, t0, t0 + 1))
            s_pos += 1
        close_run()
        return t_ids, spans

    def teacher_rows(self, rollout: Rollout, V: int):
        """Per row: (teacher prompt ids, teacher completion ids, spans, student token count)."""
        s_tok, t_tok = self.student_tokenizer, self.teacher_tokenizer
        if s_tok is None:
            raise ConfigError("SpanLogits needs the tokenizers: call prepare(models) first")
        P = rollout.prompt_len
        rows = []
        for b in range(rollout.input_ids_BL.shape[0]):
            ids = rollout.input_ids_BL[b].tolist()
            attn = rollout.attention_mask_BL[b].tolist()
            prompt = [i for i, a in zip(ids[:P], attn[:P]) if a]
            mask = rollout.completion_mask_BT[b].bool().tolist()
            comp = [i for i, m in zip(ids[P:], mask) if m]
            t_prompt = t_tok.encode(
                s_tok.decode(prompt, skip_special_tokens=False), add_special_tokens=False
            )
            t_comp, spans = self.teacher_completion(comp, V)
            rows.append((t_prompt, t_comp, spans, len(comp)))
        return rows

    @torch.no_grad()
    def score(self, teacher, rollout: Rollout, vocab_size: int) -> SpanPairScores:
        rows = self.teacher_rows(rollout, vocab_size)
        t_tok = self.teacher_tokenizer
        pad = t_tok.pad_token_id if t_tok.pad_token_id is not None else t_tok.eos_token_id
        P = max((len(r[0]) for r in rows), default=0)
        T = max(1, max((len(r[1]) for r in rows), default=0))
        ids = torch.full((len(rows), P + T), int(pad), dtype=torch.long)
        attn = torch.zeros_like(ids)
        cmask = torch.zeros(len(rows), T, dtype=torch.long)
        pairs_s, pairs_t, n_spans, masked_spans, masked_tokens = [], [], 0, 0, 0
        s_off = t_off = 0
        for b, (t_prompt, t_comp, spans, n_s) in enumerate(rows):
            ids[b, P - len(t_prompt) : P] = torch.tensor(t_prompt, dtype=torch.long)
            attn[b, P - len(t_prompt) : P] = 1
            ids[b, P : P + len(t_comp)] = torch.tensor(t_comp, dtype=torch.long)
            attn[b, P : P + len(t_comp)] = 1
            cmask[b, : len(t_comp)] = 1
            pairs, masked = span_pairs(spans, self.span_rule)
            pairs_s += [s_off + s for s, _ in pairs]
            pairs_t += [t_off + t for _, t in pairs]
            n_spans += len(spans)
            masked_spans += masked
            masked_tokens += n_s - len(pairs)
            s_off, t_off = s_off + n_s, t_off + len(t_comp)
        t_rollout = Rollout(ids, attn, P, cmask, writer=rollout.writer)
        full = FullLogits().score(teacher, t_rollout, len(t_tok))
        index_t = torch.tensor(pairs_t, dtype=torch.long, device=full.hidden_ND.device)
        U = full.head_VD.shape[0]
        ms, mt = self._matches(vocab_size, U)
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


class NonFiniteTeacher(OpdError):
    """The teacher's hidden rows at the aligned pairs hold NaN/inf."""


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
            raise NonFiniteTeacher(
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
