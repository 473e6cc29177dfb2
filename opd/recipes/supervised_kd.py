"""Supervised (word-level) KD (Hinton et al. 2015; Sanh et al. 2019) on dataset completions.

Signal: KL(p_teacher ‖ q_student) per token on the rows' reference completions: the
off-policy baseline whose exposure bias on-policy methods remove. Deviations: none (no
hard-label cross-entropy term; add one with a custom method if you want it).
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import dataset
from opd.signals import Divergence


@recipe(
    citation="Hinton et al., Distilling the Knowledge in a Neural Network, 2015",
    summary="dataset writes y; KL(p_teacher ‖ q_student) per token (off-policy)",
    signal="logit",
    access="white-box",
    granularity="token",
)
def supervised_kd(temperature: float = 1.0):
    """Off-policy token-level KD on reference completions."""
    return Method(
        prefixes=dataset(),
        signal=Divergence("forward_kl", {}, temperature),
        name="supervised_kd",
    )
