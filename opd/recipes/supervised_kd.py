"""Supervised (word-level) KD (Hinton et al. 2015; Sanh et al. 2019) on dataset completions.

Signal: τ²·KL(p_teacher ‖ q_student) per token on the rows' reference completions, with
p = softmax(z_T/τ), q = softmax(z_S/τ): the off-policy baseline whose exposure bias on-policy
methods remove. Hinton et al. multiply the soft-target loss by τ² so that its gradient keeps
its scale as τ changes (`tau_squared=True`, the default here; at τ = 1 it changes nothing).
Deviations: no hard-label cross-entropy term (Hinton et al. add one with a small weight;
compose a custom method if you want it).
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import dataset
from opd.signals import Divergence


@recipe(
    citation="Hinton et al., Distilling the Knowledge in a Neural Network, 2015",
    summary="dataset writes y; τ²·KL(p_teacher ‖ q_student) per token (off-policy)",
    signal="logit",
    access="white-box",
    granularity="token",
)
def supervised_kd(temperature: float = 1.0, tau_squared: bool = True):
    """Off-policy token-level KD on reference completions, loss scaled by τ² (Hinton's)."""
    return Method(
        prefixes=dataset(),
        signal=Divergence("forward_kl", {}, temperature, tau_squared=tau_squared),
    )
