"""DistiLLM (Ko et al., ICML 2024): skew KL with adaptive off-policy student outputs.

Signal: skew KL(p_teacher ‖ α·p + (1−α)·q_student) (SKL, α = 0.1), or with
`divergence="skew_reverse_kl"` skew KL(q ‖ (1−α)·p + α·q) (SRKL). DistiLLM's released scripts use SKL for GPT-2
("adaptive-sfkl") and SRKL for OPT ("adaptive-srkl") and OpenLLaMA; opd defaults to SKL.
Prefix source: `replay`: with probability ρ student-generated outputs (fresh, or
replayed from a 1000-sample buffer, the fresh share falling as ρ·(1 − progress)), else the
dataset's completions.
Deviations:
- ρ follows a linear schedule ρ_start → ρ_end over training instead of rising by 0.1
  whenever the validation loss rises (the loop feeds no validation loss to prefix sources).
- opd reports the KL itself, DistiLLM's code the cross-entropy (KL + H(p), same gradient).
- DistiLLM's scripts can add a language-modelling loss on a pre-training corpus to the
  distillation loss (an optional term, off unless a corpus is given); opd has no such term.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import replay
from opd.signals import Divergence


@recipe(
    citation="Ko et al., DistiLLM: Towards Streamlined Distillation for Large Language Models, "
    "ICML 2024",
    summary="skew KL(p ‖ αp+(1−α)q) on dataset or (replayed) student outputs, student share ρ rising",
    signal="logit",
    access="white-box",
    granularity="token",
)
def distillm(
    alpha: float = 0.1,
    divergence: str = "skew_forward_kl",
    capacity: int = 1000,
    rho_start: float = 0.0,
    rho_end: float = 1.0,
    other: str = "dataset",
    temperature: float = 1.0,
):
    """DistiLLM with skew `alpha` and a replay buffer of `capacity` student outputs."""
    if divergence not in ("skew_forward_kl", "skew_reverse_kl"):
        raise ValueError(
            f"divergence must be 'skew_forward_kl' or 'skew_reverse_kl', got {divergence!r}"
        )
    return Method(
        prefixes=replay(capacity=capacity, rho_start=rho_start, rho_end=rho_end, other=other),
        signal=Divergence(divergence, {"alpha": alpha}, temperature),
    )
