"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025).

The student learns toward a moving target between itself and the teacher (logit space, the
paper's form):

    r_t = softmax((1 − λ) · z_student.detach() + λ · z_teacher),   L_t = KL(r_t ‖ q_student)

with λ rising over training from λ_0 to 1, so a large teacher–student gap is crossed in small
steps. Here λ = opd.signals.Linear(λ_0, 1.0), evaluated at progress = step / total_steps.
Computed by `opd.losses.taid` (`space="prob"` gives the probability mixture
r = (1 − λ)·q.detach() + λ·p of docs/methods.md §2 instead).

Deviations:
- λ schedule: TAID's default is adaptive: λ starts at t_start = 0.4 and grows by a momentum
  rule driven by the relative change of the loss (α = 5e-4, β = 0.99 in the authors' code).
  That rule is not in `opd.losses.adaptive`, so λ rises linearly from λ_0 = 0.4 (the authors'
  t_start) to 1. The linear schedule is TAID's "disable_adaptive" ablation.
- Prefixes: TAID was formulated and evaluated off-policy (dataset responses); opd defaults to
  student rollouts, `prefixes="dataset"` is the paper's setting.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.signals import Divergence, Linear, prefix_source


@recipe(
    citation="Shing et al., TAID: Temporally Adaptive Interpolated Distillation for Efficient "
    "Knowledge Transfer in Language Models, ICLR 2025",
    summary="KL(r‖q) to a student→teacher interpolated target, λ rising linearly from λ0 to 1",
    signal="logit",
    access="white-box",
    granularity="token",
)
def taid(
    lam0: float = 0.4,
    space: str = "logit",
    temperature: float = 1.0,
    prefixes: str = "student",
    lmbda: float = 0.5,
):
    """TAID with λ from `lam0` (at step 0) to 1 (at the last step), interpolating in `space`."""
    if not 0.0 <= lam0 <= 1.0:
        raise ValueError(f"lam0 must be in [0, 1], got {lam0}")
    return Method(
        prefixes=prefix_source(prefixes, lmbda),
        signal=Divergence("taid", {"lam": Linear(lam0, 1.0), "space": space}, temperature),
    )
