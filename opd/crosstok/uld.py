"""GOLD-style cross-tokenizer loss: a divergence on exact vocabulary matches + ULD on the rest.

Two models with different vocabularies (student V, teacher U) each predict the next token
after the same text. Their distributions live on different supports, so no per-token KL
exists. Two published answers, and what opd takes from each:

ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs"). Sort both probability vectors in decreasing order, pad the
shorter with zeros, and take the L1 distance of the sorted vectors:

    ULD(q, p) = Σ_i | sort↓(q)_i − sort↓(p)_i |

the closed form of the Wasserstein-1 distance between the two distributions when every
token-to-token transport costs the same (ranks are matched, token identities ignored). The
paper's loss is L = CE(y) + λ · Σ_t ULD(q_t, p_t) averaged over the aligned positions, with
λ = 1.5 (distil_factor in the authors' code), both temperatures 1, the EOS of each side
optionally skipped, and positions aligned by index: answer token t of the student with answer
token t of the teacher, truncated to the shorter answer (no text alignment).

GOLD (Patiño et al., Hugging Face 2025, "Unlocking On-Policy Distillation for Any Model
Family"; TRL `GOLDTrainer`, trl/experimental/gold). On-policy, with two additions:
- Positions are aligned by byte offsets: both tokenisations of the completion are walked
  and a group closes where both reach the same byte (the spans of `opd.crosstok.align`).
  A group of several tokens is merged into one vector: the full distribution at the
  group's first position times the scalar probabilities of the group's later (realised)
  tokens (unnormalised).
- "Hybrid" loss (uld_use_hybrid_loss): token strings equal in both vocabularies
  (get_vocab() keys) form a one-to-one map. On the matched columns the generalized JSD
  with the trainer's β (default 0.5) is taken on the raw, unrenormalised probabilities
  (log of the clamped probabilities); on the unmatched columns the sorted L1 above. The two
  parts are weighted by uld_hybrid_matched_weight / uld_hybrid_unmatched_weight, default
  None = adaptive: matched share M/U of the teacher vocabulary and 1 − M/U.
  Other defaults: uld_crossentropy_weight 0.0, uld_distillation_weight 1.0,
  uld_student_temperature = uld_teacher_temperature = 1.0, skip EOS on both sides.

opd's loss, per aligned position pair n (one student position, one teacher position, both
predicting the next token after the same bytes), with M matched pairs (ids_s_M ↔ ids_t_M),
q = softmax(z_s / τ) over V, p = softmax(z_t / τ) over U:

    matched_n = D( p̃_n, q̃_n )        q̃ = q[ids_s_M] / Σ q[ids_s_M]  (= softmax of z_s[ids_s_M]/τ)
                                       p̃ = p[ids_t_M] / Σ p[ids_t_M]
    uld_n     = Σ_i | sort↓(q[rest_s])_i − sort↓(p[rest_t])_i |   (shorter padded with zeros)
    value_n   = matched_weight · matched_n + uld_weight · uld_n

D is any registered `opd.losses` divergence (default reverse_kl, KL(q̃_student ‖ p̃_teacher),
the on-policy direction). The ULD part uses the raw probabilities of the unmatched remainder,
so it also penalises a mismatch of the matched mass: uld_n ≥ |(1 − Σq[ids_s_M]) −
(1 − Σp[ids_t_M])|. Properties (tested): with identical vocabularies (every id matched to
itself) rest is empty, uld_n = 0 and value_n = matched_weight · D(p, q), the plain
divergence; uld_n = 0 whenever the sorted remainders agree (a permutation of the
unmatched tokens); gradients pass float64 gradcheck; `chunked_gold_loss` equals `gold_loss`.

Deviations from GOLD / ULD:
- The matched part renormalises both sides over the matched tokens (a proper divergence that
  reduces to the plain one with identical vocabularies) and defaults to reverse KL, not
  TRL's generalized JSD (β = 0.5) on unrenormalised probabilities; any opd divergence can be
  named (generalized_jsd with beta=0.5 included).
- Fixed weights (matched_weight = uld_weight = 1 by default), not TRL's adaptive M/U split;
  no cross-entropy term (on-policy: the student's own samples are not targets).
- One temperature τ for both sides (GOLD/ULD allow two).
- Multi-token spans are not merged by probability products: each aligned span contributes
  one pair, its first student position with its first teacher position (both condition on
  the same text, so their next-token distributions are over continuations of the same
  bytes); the span's other student tokens get no value and are counted as masked
  (`span_rule="first"`). `span_rule="one_to_one"` keeps only spans with one token on each
  side (GOLD's unmerged case) and masks the rest.
- Vocabulary matches compare the bytes each token decodes to (`opd.crosstok.vocab_map`),
  not raw vocabulary strings, so "Ġthe" (byte-level BPE) matches "▁the" (SentencePiece);
  special tokens never match.

Memory: `gold_loss` is the plain reference (it takes (N, V) and (N, U) logits);
`chunked_gold_loss` takes hidden states and lm_heads and never holds more than one chunk of
C rows of logits per model (the generic row-chunked autograd of `opd.losses.chunked`, which
recomputes each chunk's logits in the backward). Measured on CPU (float32, forward +
backward, N = 1024 pairs, V = 32,000, U = 50,000, M = 20,000 matches, peak RSS above the
inputs): materialized 1545 MB, chunked with C = 256 620 MB (sorting keeps values and int64
indices of each block), at 1.6× the time (the backward recomputes the chunk).
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.losses.chunked import _ChunkedHeadFunction, _project
from opd.losses.divergences import get_divergence, upcast


def complement_ids(ids_M: Tensor, size: int) -> Tensor:
    """The ids in [0, size) that are not in ids_M, ascending (the unmatched remainder)."""
    keep = torch.ones(size, dtype=torch.bool, device=ids_M.device)
    keep[ids_M] = False
    return keep.nonzero().squeeze(-1)


def sorted_l1(probs_a_NA: Tensor, probs_b_NB: Tensor) -> Tensor:
    """Σ_i |sort↓(a)_i − sort↓(b)_i| per row, the shorter vector padded with zeros: (N,)."""
    a = probs_a_NA.sort(dim=-1, descending=True).values
    b = probs_b_NB.sort(dim=-1, descending=True).values
    k = min(a.shape[-1], b.shape[-1])
    head = (a[:, :k] - b[:, :k]).abs().sum(-1)
    return head + a[:, k:].sum(-1) + b[:, k:].sum(-1)  # |x − 0| = x for probabilities


def _check_matches(match_s_M: Tensor, match_t_M: Tensor, V: int, U: int) -> None:
    if match_s_M.dim() != 1 or match_s_M.shape != match_t_M.shape:
        raise ValueError(
            f"match_s_M and match_t_M must be 1-D of equal length, got "
            f"{tuple(match_s_M.shape)} and {tuple(match_t_M.shape)}"
        )
    if match_s_M.numel() and (int(match_s_M.max()) >= V or int(match_t_M.max()) >= U):
        raise ValueError(f"match ids out of range: student V = {V}, teacher U = {U}")
    if match_s_M.unique().numel() != match_s_M.numel():
        raise ValueError("match_s_M repeats an id; the vocabulary map must be one-to-one")
    if match_t_M.unique().numel() != match_t_M.numel():
        raise ValueError("match_t_M repeats an id; the vocabulary map must be one-to-one")


def gold_loss(
    student_logits_NV: Tensor,
    teacher_logits_NU: Tensor,
    match_s_M: Tensor,
    match_t_M: Tensor,
    *,
    temperature: float = 1.0,
    matched_weight: float = 1.0,
    uld_weight: float = 1.0,
    divergence: str = "reverse_kl",
    **params: float,
) -> Tensor:
    """Per-pair GOLD-style values (module docstring): the plain (N, V) reference.

    Args:
      student_logits_NV: (N, V) student logits at the paired student positions.
      teacher_logits_NU: (N, U) teacher logits at the paired teacher positions (constant).
      match_s_M, match_t_M: (M,) one-to-one exact matches, student id ↔ teacher id.
      temperature: τ > 0 for both softmaxes.
      matched_weight, uld_weight: weights of the matched divergence and the ULD part.
      divergence: a registered opd divergence for the matched part; **params its parameters.

    Returns:
      (N,) values, float32 (float64 for float64 inputs).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    V, U = student_logits_NV.shape[-1], teacher_logits_NU.shape[-1]
    _check_matches(match_s_M, match_t_M, V, U)
    fn = get_divergence(divergence, params)
    return _gold_values(
        student_logits_NV,
        teacher_logits_NU.detach(),
        match_s_M,
        match_t_M,
        complement_ids(match_s_M, V),
        complement_ids(match_t_M, U),
        fn,
        params,
        temperature,
        matched_weight,
        uld_weight,
    )


def _gold_values(z_s, z_t, ms, mt, rest_s, rest_t, fn, params, tau, w_matched, w_uld) -> Tensor:
    z_s, z_t = upcast(z_s), upcast(z_t.to(z_s.dtype))
    n = z_s.shape[0]
    values = z_s.new_zeros(n)
    if ms.numel() and w_matched != 0.0:
        values = values + w_matched * fn(z_s[:, ms], z_t[:, mt], tau, **params)
    if (rest_s.numel() or rest_t.numel()) and w_uld != 0.0:
        q_NV = torch.softmax(z_s / tau, dim=-1)
        p_NU = torch.softmax(z_t / tau, dim=-1)
        values = values + w_uld * sorted_l1(q_NV[:, rest_s], p_NU[:, rest_t])
    return values


def chunked_gold_loss(
    student_hidden_ND: Tensor,
    student_head_VD: Tensor,
    teacher_hidden_NE: Tensor,
    teacher_head_UE: Tensor,
    match_s_M: Tensor,
    match_t_M: Tensor,
    *,
    temperature: float = 1.0,
    matched_weight: float = 1.0,
    uld_weight: float = 1.0,
    divergence: str = "reverse_kl",
    chunk_size: int = 512,
    **params: float,
) -> Tensor:
    """`gold_loss` from hidden states and lm_heads, C rows of logits at a time.

    Equal to gold_loss(student_hidden @ student_head.T, teacher_hidden @ teacher_head.T, ...)
    in value and in gradient w.r.t. the student's hidden states and head; the teacher is a
    constant. Returns (N,) values.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if student_hidden_ND.shape[0] != teacher_hidden_NE.shape[0]:
        raise ValueError(
            f"student rows N = {student_hidden_ND.shape[0]} but teacher rows "
            f"N = {teacher_hidden_NE.shape[0]}; pass one teacher row per student row"
        )
    V, U = student_head_VD.shape[0], teacher_head_UE.shape[0]
    _check_matches(match_s_M, match_t_M, V, U)
    fn = get_divergence(divergence, params)
    rest_s, rest_t = complement_ids(match_s_M, V), complement_ids(match_t_M, U)
    t_hidden, t_head = teacher_hidden_NE.detach(), teacher_head_UE.detach()

    def row_fn(student_logits_CV: Tensor, start: int, end: int) -> Tensor:
        with torch.no_grad():
            teacher_logits_CU = _project(t_hidden[start:end], t_head, None)
        return _gold_values(
            student_logits_CV,
            teacher_logits_CU,
            match_s_M,
            match_t_M,
            rest_s,
            rest_t,
            fn,
            params,
            temperature,
            matched_weight,
            uld_weight,
        )

    out_dtype = torch.promote_types(
        torch.promote_types(student_hidden_ND.dtype, teacher_hidden_NE.dtype), torch.float32
    )
    return _ChunkedHeadFunction.apply(
        student_hidden_ND, student_head_VD, None, row_fn, chunk_size, out_dtype
    )
