"""Per-token divergences between the teacher's and the student's next-token distributions.

Every function here takes logits of shape (..., V) for both models and returns a tensor of
shape (...): one value per token, never reduced (the caller masks and reduces, see
`opd.losses.reduce`). With temperature τ applied to both sides,

    p = softmax(teacher_logits / τ)      (teacher)
    q = softmax(student_logits / τ)      (student)

and

    forward_kl          KL(p_teacher ‖ q_student) = Σ_v p_v (log p_v − log q_v)
    reverse_kl          KL(q_student ‖ p_teacher) = Σ_v q_v (log q_v − log p_v)
    generalized_jsd(β)  m = β·p + (1−β)·q;  β·KL(p ‖ m) + (1−β)·KL(q ‖ m)
                        β = 0 returns forward_kl and β = 1 returns reverse_kl exactly
                        (special-cased, the GKD convention)
    total_variation     ½ Σ_v |p_v − q_v|, in [0, 1]
    skew_forward_kl(α)  KL(p ‖ α·p + (1−α)·q)      (DistiLLM SKL, α = 0.1)
    skew_reverse_kl(α)  KL(q ‖ (1−α)·p + α·q)      (DistiLLM SRKL, α = 0.1); with
                        stop_grad_mix, KL(q ‖ (1−α)·p + α·sg(q)) (DistiLLM-2's gradient)

Note on the GKD ends: the mixture form itself tends to 0 as β → 0 or β → 1 (m → q or
m → p), like β·KL(p ‖ q) near β = 0 and (1−β)·KL(q ‖ p) near β = 1. The ends are therefore a
deliberate discontinuity: β = 0 and β = 1 switch to the plain KLs, as GKD implementations do.

References:
    GKD: Agarwal et al., "On-Policy Distillation of Language Models: Learning from
        Self-Generated Mistakes", ICLR 2024.
    DistiLLM: Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language
        Models", ICML 2024.

opd returns the divergence itself, which is 0 when p = q. DistiLLM's code returns a
cross-entropy for its forward and skew-forward losses, −Σ p log m = KL(p ‖ m) + H(p): the
gradient with respect to the student is the same, the value differs by the teacher entropy
H(p). Compare values with that in mind.

Numerics: everything is computed from log_softmax outputs, as exp(log a)·(log a − log b), so a
probability that underflows to 0 contributes 0 instead of 0·log 0 = NaN; mixtures are formed
with logaddexp. bf16/fp16 logits are upcast to float32; float64 stays float64. Logits must
be finite (mask a vocabulary entry with a large negative finite value, not −inf).

Divergences live in the registry `DIVERGENCES` (name -> function); `divergence(name, ...)`
looks one up and checks its parameters. `opd.losses.adaptive` adds its entries to the same
registry, and `opd.losses.chunked` computes any registered entry without the (N, V) logits.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Divergence = Callable[..., Tensor]
"""fn(student_logits, teacher_logits, temperature=1.0, **params) -> per-token values."""

DIVERGENCES: dict[str, Divergence] = {}
"""Every registered per-token divergence, by name."""

_POSITIONAL = ("student_logits", "teacher_logits", "temperature")


def register_divergence(name: str) -> Callable[[Divergence], Divergence]:
    """Decorator: add a divergence to `DIVERGENCES` under `name` (names must be unique)."""

    def add(fn: Divergence) -> Divergence:
        if name in DIVERGENCES:
            raise ValueError(f"divergence {name!r} is already registered")
        DIVERGENCES[name] = fn
        return fn

    return add


# ---------------------------------------------------------------------------------------------
# Building blocks, shared with opd.losses.adaptive.


def check_logits_pair(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> None:
    """Raise ValueError unless both logits are (..., V) of one shape and temperature > 0."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} != teacher_logits shape "
            f"{tuple(teacher_logits.shape)}; both must be (..., V) with the same V"
        )
    if student_logits.dim() == 0:
        raise ValueError("logits must have a vocabulary dimension, got a 0-d tensor")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def upcast(x: Tensor) -> Tensor:
    """Return x in float32 if it is a narrower (or non-float) type; float32/float64 unchanged."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / τ) over the last dimension, in at least float32.

    Args:
        logits: (..., V).
        temperature: τ > 0.

    Returns:
        (..., V) log-probabilities.
    """
    logits = upcast(logits)
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


def kl_from_log_probs(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ_v a_v (log a_v − log b_v) over the last dimension, from log-probabilities.

    An entry with a_v = 0 (underflowed) contributes exp(log a_v)·finite = 0, not NaN.

    Args:
        log_a, log_b: (..., V) log-probabilities.

    Returns:
        (...) values.
    """
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1−w)·b) elementwise from log-probabilities, exact at w = 0 and w = 1.

    Args:
        log_a, log_b: (..., V) log-probabilities.
        weight_a: w in [0, 1], the weight of a.

    Returns:
        (..., V) log-probabilities of the mixture.
    """
    if weight_a == 0:
        return log_b
    if weight_a == 1:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def check_unit_interval(name: str, value: float, error: type[Exception] = ValueError) -> None:
    """Raise `error` (ValueError by default) unless 0 <= value <= 1 (NaN is refused too)."""
    if not 0.0 <= value <= 1.0:
        raise error(f"{name} must be in [0, 1], got {value}")


def pair_log_probs(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """(log q_student, log p_teacher), each (..., V), after the shape and temperature checks."""
    check_logits_pair(student_logits, teacher_logits, temperature)
    return log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)


# ---------------------------------------------------------------------------------------------
# The divergences.


@register_divergence("forward_kl")
def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_teacher ‖ q_student) = Σ_v p_v (log p_v − log q_v); mode covering.

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0, applied to both logits.

    Returns:
        (...) per-token values, ≥ 0.
    """
    log_q, log_p = pair_log_probs(student_logits, teacher_logits, temperature)
    return kl_from_log_probs(log_p, log_q)


@register_divergence("reverse_kl")
def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(q_student ‖ p_teacher) = Σ_v q_v (log q_v − log p_v); mode seeking.

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0, applied to both logits.

    Returns:
        (...) per-token values, ≥ 0.
    """
    log_q, log_p = pair_log_probs(student_logits, teacher_logits, temperature)
    return kl_from_log_probs(log_q, log_p)


@register_divergence("generalized_jsd")
def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, *, beta: float = 0.5
) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al., ICLR 2024).

    m = β·p_teacher + (1−β)·q_student; value β·KL(p ‖ m) + (1−β)·KL(q ‖ m). At β = 0.5 it is
    the Jensen-Shannon divergence, ≤ log 2. β = 0 returns `forward_kl` and β = 1 returns
    `reverse_kl` exactly (GKD convention; the mixture itself tends to 0 at both ends).

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0, applied to both logits.
        beta: β in [0, 1], the teacher's weight in the mixture.

    Returns:
        (...) per-token values, ≥ 0.
    """
    check_unit_interval("beta", beta)
    if beta == 0:
        return forward_kl(student_logits, teacher_logits, temperature)
    if beta == 1:
        return reverse_kl(student_logits, teacher_logits, temperature)
    log_q, log_p = pair_log_probs(student_logits, teacher_logits, temperature)
    log_m = log_mixture(log_p, log_q, beta)
    return beta * kl_from_log_probs(log_p, log_m) + (1 - beta) * kl_from_log_probs(log_q, log_m)


@register_divergence("total_variation")
def total_variation(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """Total variation distance ½ Σ_v |p_v − q_v|, bounded in [0, 1].

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0, applied to both logits.

    Returns:
        (...) per-token values in [0, 1].
    """
    log_q, log_p = pair_log_probs(student_logits, teacher_logits, temperature)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


@register_divergence("skew_forward_kl")
def skew_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, *, alpha: float = 0.1
) -> Tensor:
    """Skew KL(p_teacher ‖ α·p + (1−α)·q_student), DistiLLM's SKL (Ko et al., ICML 2024).

    α = 0 is `forward_kl`; α = 1 gives 0.

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0, applied to both logits.
        alpha: α in [0, 1], the teacher's share of the skewed student.

    Returns:
        (...) per-token values, ≥ 0.
    """
    check_unit_interval("alpha", alpha)
    log_q, log_p = pair_log_probs(student_logits, teacher_logits, temperature)
    return kl_from_log_probs(log_p, log_mixture(log_p, log_q, alpha))


@register_divergence("skew_reverse_kl")
def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    alpha: float = 0.1,
    stop_grad_mix: bool = False,
) -> Tensor:
    """Skew KL(q_student ‖ (1−α)·p_teacher + α·q), DistiLLM's SRKL (Ko et al., ICML 2024).

    α = 0 is `reverse_kl`; α = 1 gives 0. With `stop_grad_mix` the student's share of the
    mixture is a constant for the gradient, m = (1−α)·p + α·sg(q) (DistiLLM-2's code): the
    value is unchanged, and the gradient w.r.t. the student logits z is
    ∂/∂z_j = q_j·(d_j − Σ_v q_v d_v)/τ with d = log q − log m.

    Args:
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0, applied to both logits.
        alpha: α in [0, 1], the student's share of the skewed teacher.
        stop_grad_mix: detach the student's share of the mixture.

    Returns:
        (...) per-token values, ≥ 0.
    """
    check_unit_interval("alpha", alpha)
    log_q, log_p = pair_log_probs(student_logits, teacher_logits, temperature)
    log_q_in_mix = log_q.detach() if stop_grad_mix else log_q
    return kl_from_log_probs(log_q, log_mixture(log_q_in_mix, log_p, alpha))


# ---------------------------------------------------------------------------------------------
# Lookup by name.


def get_divergence(name: str, params: dict | None = None) -> Divergence:
    """Look up a registered divergence and check parameter names.

    Args:
        name: a key of `DIVERGENCES`.
        params: keyword parameters meant for it (names are checked, values are checked by
            the divergence itself when it runs).

    Returns:
        The divergence function.

    Raises:
        ValueError: unknown name (the message lists the valid names).
        TypeError: a parameter the divergence does not accept (the message names it).
    """
    if name not in DIVERGENCES:
        raise ValueError(
            f"unknown divergence {name!r}; valid names: {', '.join(sorted(DIVERGENCES))}"
        )
    fn = DIVERGENCES[name]
    if params:
        accepted = divergence_params(name)
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise TypeError(
                f"divergence {name!r} got unknown parameter(s) {', '.join(unknown)}; "
                f"it accepts: {', '.join(accepted) or 'no parameters'}"
            )
    return fn


def divergence_params(name: str) -> tuple[str, ...]:
    """The keyword parameters (beyond the logits and temperature) that divergence `name` takes."""
    fn = get_divergence(name)
    return tuple(p for p in inspect.signature(fn).parameters if p not in _POSITIONAL)


def divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    **params: float,
) -> Tensor:
    """Per-token divergence `name` between teacher and student, never reduced.

    Args:
        name: a key of `DIVERGENCES`, e.g. "forward_kl", "generalized_jsd".
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: τ > 0, applied to both logits.
        **params: the divergence's own parameters, e.g. beta=0.5.

    Returns:
        (...) per-token values, float32 (float64 for float64 inputs).
    """
    fn = get_divergence(name, params)
    return fn(student_logits, teacher_logits, temperature, **params)
