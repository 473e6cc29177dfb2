"""GATES: self-distillation under privileged context with consensus gating (Stein, Huang &
Goldstein, 2026, arXiv 2602.20574).

One model is tutor and student. The tutor, the self-teacher shown the row's document
(`field`, default `context`; template "{prompt}\n\n{context}"), samples k completions per
prompt; a prompt passes the gate when the share of samples whose final answer equals the
majority answer reaches τ = `threshold`, and only those majority samples are kept
(`opd.selfdistill.gates`). On the kept tokens the student, shown the prompt alone, minimises
the reverse KL to the document-conditioned self, per token over the full vocabulary:

    D_t = KL(q_θ(·|x, y<t) ‖ p_T(·|x, document, y<t)),   y = a kept tutor sample

averaged over the step's kept tokens (a step where nothing passes has loss 0). The gate pass
rate, the mean agreement and the share of samples kept are logged. No label is read. The
self-teacher is `live` (the current weights, the paper's shared tutor) by default; `frozen`,
`ema` and `adapter_off` are offered.

Deviations:
- The paper's distillation loss on the kept tutor trajectories is not reproduced exactly
  (not verified here); as issue 11 asks, it is the token-level reverse KL to the
  document-conditioned self on those trajectories.
- k = 4 samples and τ = 0.5 by default (the paper samples 8; its exact τ is not verified).
- The paper's optional sparse correctness reward and KL regulariser are not offered.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.selfdistill import TEMPLATE, SelfAccess
from opd.selfdistill.gates import ConsensusSamples
from opd.signals import Divergence


@recipe(
    citation="Stein, Huang & Goldstein, GATES: Self-Distillation under Privileged Context with "
    "Consensus Gating, 2026 (arXiv 2602.20574)",
    summary="self shown the document writes k samples; where their answers agree (>= τ), "
    "KL(q_student ‖ p_self(·|document)) on the majority's samples",
    signal="logit",
    access="self",
    granularity="token",
)
def gates(
    k: int = 4,
    threshold: float = 0.5,
    teacher: str = "live",
    ema_decay: float = 0.99,
    field: str = "context",
    template: str = TEMPLATE,
    temperature: float = 1.0,
):
    """GATES: consensus-gated reverse KL to the document-conditioned self."""
    access = SelfAccess(teacher, ema_decay)
    return Method(
        prefixes=ConsensusSamples(access.teacher, k, threshold, field, template),
        teacher=access,
        signal=Divergence("reverse_kl", temperature=temperature),
    )
