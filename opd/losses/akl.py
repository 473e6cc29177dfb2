"""AKL: a per-token mixture of KL directions weighted by the head/tail gaps.

Same contract as `opd.losses.divergences`: student and teacher logits (..., V) in, per-token
values (...) out, never reduced; p = softmax(teacher_logits/τ), q = softmax(student_logits/τ).
Registered in `DIVERGENCES` as "akl".

akl(μ)              Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge
                    Distillation for Large Language Models", COLING 2025.
                    Sort p descending; head H = the largest prefix with Σ_H p ≤ μ, and
                    at least the top-1 entry (the authors' rule; `boundary="inclusive"`
                    takes the smallest prefix with Σ_H p ≥ μ instead).
                    g_head = Σ_{v∈H} |p_v − q_v|,  g_tail = Σ_{v∉H} |p_v − q_v|,
                    AKL = g_head/(g_head+g_tail) · KL(p‖q) + g_tail/(g_head+g_tail) · KL(q‖p).
                    If g_head + g_tail = 0 (p = q) both weights are ½ (the value is 0).

Deviations:
- The head/tail boundary follows the authors' code (the AKL repository's ratio
  function): the entry whose cumulative teacher mass crosses μ is tail, and the top-1 entry
  is always head. On p = [.4, .3, .2, .1], q = [.1, .6, .2, .1], μ = .5 this gives
  w_head = ½ (AKL 0.3119); the inclusive rule, kept as `boundary="inclusive"`, gives
  w_head = 1 (AKL 0.3466). Ties at the boundary go by the sort order. Where p = q the authors'
  weights are 0/0; opd uses ½ each (the value is 0 either way).
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.losses.divergences import (
    check_unit_interval,
    kl_from_log_probs,
    log_probs,
    pair_log_probs,
    register_divergence,
)

AKL_BOUNDARIES = ("authors", "inclusive")


def _check_boundary(boundary: str) -> None:
    if boundary not in AKL_BOUNDARIES:
        raise ValueError(f"boundary must be one of {AKL_BOUNDARIES}, got {boundary!r}")


def _akl_head_mask_from_probs(p_V: Tensor, mu: float, boundary: str = "authors") -> Tensor:
    """Bool (..., V): True on AKL's head entries of p (see `akl_head_mask` for the rules)."""
    sorted_p, order = p_V.sort(dim=-1, descending=True)
    mass_through = sorted_p.cumsum(-1)  # teacher mass of this entry and every larger one
    if boundary == "inclusive":
        head_sorted = mass_through - sorted_p < mu  # the crossing entry joins the head
    else:
        # The crossing entry goes to the tail, but the top-1 entry is always head. At μ = 1
        # every entry is head: the float cumsum can end a few ulps above 1 and would drop the
        # smallest entries otherwise.
        head_sorted = mass_through <= mu if mu < 1 else torch.ones_like(sorted_p, dtype=torch.bool)
        head_sorted[..., 0] = True
    return torch.zeros_like(head_sorted).scatter_(-1, order, head_sorted)


def akl_head_mask(
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    mu: float = 0.5,
    boundary: str = "authors",
) -> Tensor:
    """AKL's head: a prefix of p sorted descending, cut where the cumulative mass crosses μ.

    boundary="authors" (default, the AKL authors' code): the head is the largest prefix whose
    mass is ≤ μ, and never empty (the top-1 entry is always in it); the entry whose inclusion
    would take the mass above μ goes to the tail. boundary="inclusive" (opd before 0.2): the
    smallest prefix whose mass is ≥ μ, so the crossing entry is in the head.

    Args:
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0.
        mu: μ in [0, 1].
        boundary: "authors" or "inclusive".

    Returns:
        (..., V) bool mask, True on the head entries.
    """
    check_unit_interval("mu", mu)
    _check_boundary(boundary)
    with torch.no_grad():
        return _akl_head_mask_from_probs(log_probs(teacher_logits, temperature).exp(), mu, boundary)


def _akl_weights_from_log_probs(
    log_q: Tensor, log_p: Tensor, mu: float, boundary: str
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        p, q = log_p.exp(), log_q.exp()
        gap = (p - q).abs()  # (..., V)
        head = _akl_head_mask_from_probs(p, mu, boundary)
        g_head = torch.where(head, gap, 0.0).sum(-1)
        g_tail = torch.where(head, 0.0, gap).sum(-1)
        total = g_head + g_tail
        w_head = torch.where(
            total > 0, g_head / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5
        )
        return w_head, 1.0 - w_head


def akl_weights(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    mu: float = 0.5,
    boundary: str = "authors",
) -> tuple[Tensor, Tensor]:
    """AKL's detached weights (w_head on KL(p‖q), w_tail on KL(q‖p)); they sum to 1.

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0.
        mu: μ in [0, 1], the teacher mass that cuts the head from the tail.
        boundary: "authors" (default) or "inclusive", see `akl_head_mask`.

    Returns:
        (w_head, w_tail), each (...): g_head/(g_head+g_tail) and g_tail/(g_head+g_tail).
    """
    check_unit_interval("mu", mu)
    _check_boundary(boundary)
    log_q, log_p = pair_log_probs(student_logits, teacher_logits, temperature)
    return _akl_weights_from_log_probs(log_q, log_p, mu, boundary)


@register_divergence("akl")
def akl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    mu: float = 0.5,
    boundary: str = "authors",
) -> Tensor:
    """Adaptive KL (Wu et al., COLING 2025): w_head·KL(p‖q) + w_tail·KL(q‖p), weights detached.

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0, applied to both logits.
        mu: μ in [0, 1], the teacher mass that cuts the head from the tail.
        boundary: "authors" (default: the crossing entry is tail, top-1 always head) or
            "inclusive" (the crossing entry is head), see `akl_head_mask`.

    Returns:
        (...) per-token values, ≥ 0.
    """
    check_unit_interval("mu", mu)
    _check_boundary(boundary)
    log_q, log_p = pair_log_probs(student_logits, teacher_logits, temperature)
    w_head, w_tail = _akl_weights_from_log_probs(log_q, log_p, mu, boundary)
    return w_head * kl_from_log_probs(log_p, log_q) + w_tail * kl_from_log_probs(log_q, log_p)
