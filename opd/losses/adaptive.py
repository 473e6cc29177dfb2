"""Adaptive divergences: per-entry or per-token mixtures of KL directions, and moving targets.

(AKL, the head/tail mixture, is in `opd.losses.akl`.)

Same contract as `opd.losses.divergences`: student and teacher logits (..., V) in, per-token
values (...) out, never reduced; p = softmax(teacher_logits/τ), q = softmax(student_logits/τ).
Each is registered in `DIVERGENCES`, so `divergence(name, ...)` and `chunked_divergence(name,
...)` take it by name. All weights below are detached (constants for the gradient).

    todi(β)             Jung et al., "ToDi: Token-wise Distillation via Fine-Grained Divergence
                        Control", EMNLP 2025. Per entry a_v = sigmoid(β·(log p_v − log q_v)),
                        ToDi = Σ_v [a_v·p_v(log p_v − log q_v) + (1−a_v)·q_v(log q_v − log p_v)].
                        Each summand is ≥ 0 for β ≥ 0, so ToDi ≥ 0. At β = 1, a_v = p_v/(p_v+q_v)
                        and the value equals KL(p‖q) + KL(q‖p); the gradient does not (a is
                        detached).
    entropy_aware(h_max) Jin et al., "Entropy-Aware On-Policy Distillation of Language Models",
                        arXiv 2603.07079 (2026). a_t = clamp(H(p_t)/h_max, 0, 1), h_max = log V
                        by default; loss (1 − a_t)·KL(q‖p) + a_t·KL(p‖q).
    bridge(γ)           Veto, Jang et al., "Stable On-Policy Distillation through Adaptive Target
                        Reformulation", arXiv 2601.07155 (2026). Target
                        r = softmax((1−γ)·z_S.detach()/τ + γ·z_T/τ) (a geometric bridge,
                        r ∝ q^(1−γ)·p^γ); loss KL(r ‖ q). γ = 1 is KL(p‖q); γ = 0 gives 0.
    taid(λ)             Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for
                        Efficient Knowledge Transfer in Language Models", ICLR 2025. Target r
                        between the detached student and the teacher; loss KL(r ‖ q). λ = 1 is
                        KL(p‖q); λ = 0 gives 0.
    topk_reverse_kl(k)  Fu et al., "Revisiting On-Policy Distillation: Empirical Failure Modes
                        and Simple Fixes", arXiv 2603.25562 (2026). S = the teacher's top-k
                        entries; p_S, q_S = p and q restricted to S and renormalised;
                        loss KL(q_S ‖ p_S). k ≥ V is `reverse_kl`.

Deviations and open points. We could read the papers' abstracts and third-party summaries,
not their method sections or code; each point says what is and is not verified.

- entropy_aware: the paper's abstract describes "augmenting the standard reverse KL objective
  with forward KL when teacher entropy is high"; we could not read its exact gate. We use the
  convex, continuous gate a_t = clamp(H/h_max, 0, 1) of docs/methods.md §2. If the paper adds FKL
  on top of RKL above an entropy threshold (as "augmenting" suggests), its loss is
  RKL + 1[H > h]·FKL, which differs from ours in scale and in having a step.
- taid: the paper's intermediate target is, per the summaries, "a softmax interpolation of
  detached student logits and teacher logits", r = softmax((1−λ)·z_S.detach() + λ·z_T),
  which is exactly `bridge(γ=λ)`. That is our default (`space="logit"`, computed by
  `bridge`). The probability mixture (docs/methods.md §2)
  r = (1−λ)·q.detach() + λ·p; it is available as `space="prob"`. TAID's adaptive momentum
  update of λ is not implemented; the recipe schedules λ linearly (`opd.signals.Linear`).
- bridge: we could not read Veto's method section; the formula above (docs/methods.md §2)
  is the one opd was specified from. The paper's summaries also mention a reverse-direction
  objective and adaptive gradient clipping; neither is here.
- topk_reverse_kl: the paper also masks special tokens out of the loss; that is a token
  mask for the caller (`mask_BT`), not part of this function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from opd.losses.divergences import (
    check_logits_pair,
    check_unit_interval,
    kl_from_log_probs,
    log_mixture,
    log_probs,
    pair_log_probs,
    register_divergence,
    upcast,
)

# ---------------------------------------------------------------------------------------------
# ToDi


def _check_beta_nonnegative(beta: float) -> None:
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")


def todi_weights(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, *, beta: float = 1.0
) -> Tensor:
    """ToDi's detached per-entry weight a_v = sigmoid(β·(log p_v − log q_v)) on the FKL term.

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0.
        beta: β ≥ 0.

    Returns:
        (..., V) weights in (0, 1); > ½ where p_v > q_v (the student underestimates).
    """
    _check_beta_nonnegative(beta)
    with torch.no_grad():
        log_q, log_p = pair_log_probs(student_logits, teacher_logits, temperature)
        return torch.sigmoid(beta * (log_p - log_q))


@register_divergence("todi")
def todi(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, *, beta: float = 1.0
) -> Tensor:
    """ToDi (Jung et al., EMNLP 2025): per-entry mix of the FKL and RKL summands.

    Σ_v [a_v·p_v(log p_v − log q_v) + (1−a_v)·q_v(log q_v − log p_v)], a_v detached.

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0, applied to both logits.
        beta: β ≥ 0, the sharpness of the per-entry gate (β = 0 gives ½·(FKL + RKL)).

    Returns:
        (...) per-token values, ≥ 0.
    """
    _check_beta_nonnegative(beta)
    log_q, log_p = pair_log_probs(student_logits, teacher_logits, temperature)
    log_ratio = log_p - log_q  # (..., V)
    a = torch.sigmoid(beta * log_ratio.detach())
    fkl_terms = log_p.exp() * log_ratio
    rkl_terms = log_q.exp() * -log_ratio
    return (a * fkl_terms + (1 - a) * rkl_terms).sum(-1)


# ---------------------------------------------------------------------------------------------
# Entropy-aware


def _entropy_gate_from_log_probs(log_p: Tensor, h_max: float | None) -> Tensor:
    with torch.no_grad():
        if h_max is None:
            h_max = math.log(log_p.shape[-1]) if log_p.shape[-1] > 1 else 1.0
        elif not h_max > 0:
            raise ValueError(f"h_max must be > 0, got {h_max}")
        entropy = -(log_p.exp() * log_p).sum(-1)  # H(p), (...)
        return (entropy / h_max).clamp(0.0, 1.0)


def entropy_gate(
    teacher_logits: Tensor, temperature: float = 1.0, *, h_max: float | None = None
) -> Tensor:
    """The detached per-token gate a_t = clamp(H(p_t)/h_max, 0, 1).

    Args:
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0.
        h_max: entropy at which the gate saturates; default log V (the uniform entropy).

    Returns:
        (...) gate in [0, 1]; 0 for a one-hot teacher, 1 for a uniform one.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _entropy_gate_from_log_probs(log_probs(teacher_logits, temperature), h_max)


@register_divergence("entropy_aware")
def entropy_aware(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    h_max: float | None = None,
) -> Tensor:
    """Entropy-aware OPD: (1 − a_t)·KL(q‖p) + a_t·KL(p‖q), a_t = clamp(H(p_t)/h_max, 0, 1).

    A confident teacher gives reverse KL (mode seeking), an uncertain one forward KL (mode
    covering). See the module docstring for how this gate relates to the paper's.

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0, applied to both logits.
        h_max: entropy at which the gate saturates; default log V.

    Returns:
        (...) per-token values, ≥ 0.
    """
    log_q, log_p = pair_log_probs(student_logits, teacher_logits, temperature)
    a = _entropy_gate_from_log_probs(log_p, h_max)
    return (1 - a) * kl_from_log_probs(log_q, log_p) + a * kl_from_log_probs(log_p, log_q)


# ---------------------------------------------------------------------------------------------
# Moving targets: Veto's bridge and TAID


@register_divergence("bridge")
def bridge(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, *, gamma: float = 0.5
) -> Tensor:
    """Geometric bridge target (Veto): KL(r ‖ q), r = softmax(((1−γ)·z_S.detach() + γ·z_T)/τ).

    Args:
        student_logits: (..., V) student logits z_S.
        teacher_logits: (..., V) teacher logits z_T.
        temperature: τ > 0, applied to both logits.
        gamma: γ in [0, 1]; 1 is KL(p_teacher ‖ q_student), 0 gives 0.

    Returns:
        (...) per-token values, ≥ 0.
    """
    check_unit_interval("gamma", gamma)
    check_logits_pair(student_logits, teacher_logits, temperature)
    scaled_student = upcast(student_logits) / temperature
    scaled_teacher = upcast(teacher_logits) / temperature
    if gamma == 1:
        target_logits = scaled_teacher
    elif gamma == 0:
        target_logits = scaled_student.detach()
    else:
        target_logits = (1 - gamma) * scaled_student.detach() + gamma * scaled_teacher
    log_r = F.log_softmax(target_logits, dim=-1)
    return kl_from_log_probs(log_r, F.log_softmax(scaled_student, dim=-1))


@register_divergence("taid")
def taid(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    lam: float = 0.0,
    space: str = "logit",
) -> Tensor:
    """TAID (Shing et al., ICLR 2025): KL(r ‖ q) to a target between the student and teacher.

    space="logit" (the paper's): r = softmax((1−λ)·z_S.detach() + λ·z_T), i.e. `bridge(γ=λ)`.
    space="prob" (docs/methods.md §2): r = (1−λ)·q.detach() + λ·p.

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0, applied to both logits.
        lam: λ in [0, 1]; 1 is KL(p_teacher ‖ q_student), 0 gives 0. Schedule it with
            `opd.signals.Linear`.
        space: "logit" or "prob", where the interpolation happens.

    Returns:
        (...) per-token values, ≥ 0.
    """
    check_unit_interval("lam", lam)
    if space == "logit":
        return bridge(student_logits, teacher_logits, temperature, gamma=lam)
    if space != "prob":
        raise ValueError(f"space must be 'logit' or 'prob', got {space!r}")
    log_q, log_p = pair_log_probs(student_logits, teacher_logits, temperature)
    log_r = log_mixture(log_p, log_q.detach(), lam)
    return kl_from_log_probs(log_r, log_q)


# ---------------------------------------------------------------------------------------------
# Top-k local support


@register_divergence("topk_reverse_kl")
def topk_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, *, k: int = 16
) -> Tensor:
    """KL(q_S ‖ p_S) on the teacher's top-k support S, both renormalised over S (Fu et al.).

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0, applied to both logits.
        k: support size ≥ 1; k ≥ V uses the whole vocabulary, which is `reverse_kl`.

    Returns:
        (...) per-token values, ≥ 0 (0 when k = 1).
    """
    check_logits_pair(student_logits, teacher_logits, temperature)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = min(k, student_logits.shape[-1])  # a support as large as V is the whole vocabulary
    scaled_teacher = upcast(teacher_logits) / temperature
    scaled_student = upcast(student_logits) / temperature
    support_K = scaled_teacher.detach().topk(k, dim=-1).indices  # (..., k)
    log_p_K = F.log_softmax(scaled_teacher.gather(-1, support_K), dim=-1)
    log_q_K = F.log_softmax(scaled_student.gather(-1, support_K), dim=-1)
    return kl_from_log_probs(log_q_K, log_p_K)
