"""SKD: Speculative Knowledge Distillation (Xu et al., ICLR 2025).

Prefix source: `speculative(k)`: the student proposes each token y'_t ~ q; it is kept if
it is among the teacher's top-k tokens at t, else replaced by a sample y_t ~ p. k = |V| keeps
every proposal (on-policy KD); a small k hands most positions to the teacher (k = 1 with
greedy decoding: every token is the teacher's argmax). Signal: the per-token divergence on
these interleaved sequences, by default KL(p_teacher ‖ q_student).
Deviations: the paper's top-k and per-task divergence choices could not be confirmed from the
sources at hand; opd defaults to k = 25 and forward KL (`divergence=` takes any
parameter-free divergence name, e.g. "reverse_kl"; build a Method for a JSD).
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import speculative
from opd.signals import Divergence


@recipe(
    citation="Xu et al., Speculative Knowledge Distillation: Bridging the Teacher-Student Gap "
    "Through Interleaved Sampling, ICLR 2025",
    summary="student proposes, teacher replaces tokens outside its top-k; KL(p_teacher ‖ q_student)",
    signal="logit",
    access="white-box",
    granularity="token",
)
def skd(k: int = 25, divergence: str = "forward_kl", temperature: float = 1.0):
    """SKD with teacher top-`k` verification and a parameter-free divergence."""
    return Method(
        prefixes=speculative(k=k),
        signal=Divergence(divergence, {}, temperature),
    )
