"""Revisiting OPD: teacher top-k local support matching (Fu et al., "Revisiting On-Policy
Distillation: Empirical Failure Modes and Simple Fixes", arXiv 2603.25562, 2026).

On the student's rollouts, restrict both distributions to the teacher's top-k set S_t and
renormalise, then take the reverse KL there; template/special target tokens are masked:

    L_t = 1[y_t not special] · KL(q_S ‖ p_S),   p_S = p|_S / p(S),  q_S = q|_S / q(S)

Computed by `opd.losses.topk_reverse_kl` and `opd.weights.SpecialTokenMask`.

Deviations: the paper also samples rollouts with top-p; that is a generation setting here
(`sampling.top_p`, e.g. 0.95), not part of the method. Its k is not verified (default 16).
The stop tokens (eos, end-of-turn) are kept in the loss by default (`mask_stop=False`); see
`opd.weights.SpecialTokenMask` for why.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.signals import Divergence, prefix_source
from opd.weights import SpecialTokenMask


@recipe(
    citation="Fu et al., Revisiting On-Policy Distillation: Empirical Failure Modes and Simple "
    "Fixes, arXiv 2603.25562, 2026",
    summary="KL(q‖p) on the teacher's renormalised top-k support, special tokens masked",
    signal="logit",
    access="white-box",
    granularity="token",
)
def revisiting_opd(
    k: int = 16,
    mask_stop: bool = False,
    temperature: float = 1.0,
    prefixes: str = "student",
    lmbda: float = 0.5,
):
    """Top-k local-support reverse KL with a special-token mask (`mask_stop`: mask eos too)."""
    return Method(
        prefixes=prefix_source(prefixes, lmbda),
        signal=Divergence("topk_reverse_kl", {"k": k}, temperature),
        weights=(SpecialTokenMask(keep_stop=not mask_stop),),
    )
