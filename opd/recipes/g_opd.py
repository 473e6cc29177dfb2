"""G-OPD: Generalized On-Policy Distillation (Yang et al., 2026, arXiv 2602.12125).

Objective: max E_{y~π_θ}[ λ·log(π*(y)/π_ref(y)) − KL(π_θ ‖ π_ref) ], taken per token as the
advantage A_t = λ·(log p(y_t) − log π_ref(y_t)) − (log q(y_t) − log π_ref(y_t)) with loss
−A_t · log q(y_t). λ = 1 is standard OPD (π_ref cancels); λ > 1 is ExOPD (see `exopd`).
π_ref is a frozen copy of the initial student (one extra copy of its weights in memory).
Deviations: the per-token dense form (KL in reward form, no separate k3 loss) is our reading
of the paper's objective; the paper's "reward correction" (π_ref = the teacher's pre-RL base)
needs a second model and is available only through `GOPD(reference=...)` in code. On
`--resume` the reference is still the initial student: the loop snapshots it (`prepare`)
before the checkpoint is restored, and the initial student is rebuilt from the config.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import student
from opd.signals import GOPD
from opd.teachers import SampledLogprobs


@recipe(
    citation="Yang et al., Learning beyond Teacher: Generalized On-Policy Distillation with "
    "Reward Extrapolation, 2026 (arXiv 2602.12125)",
    summary="student writes y; reward λ(log p − log π_ref)(y_t) with a KL(π_θ ‖ π_ref) penalty",
    signal="sampled log-prob",
    access="sampled",
    granularity="token",
)
def g_opd(lam: float = 1.0, kl_coef: float = 1.0):
    """G-OPD with reward scale `lam` and KL weight `kl_coef` (λ = β = 1 is OPD)."""
    return Method(
        prefixes=student(),
        teacher=SampledLogprobs(),
        signal=GOPD(lam=lam, kl_coef=kl_coef),
    )
