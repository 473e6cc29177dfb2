"""Sequence-level KD (Kim & Rush, EMNLP 2016): train on completions the teacher wrote.

Signal: KL(p_teacher ‖ q_student) per token on teacher-sampled y.
Deviation from the paper: Kim & Rush train with cross-entropy on the teacher's beam-search
output; opd samples the teacher (temperature from the generation config; 0 = greedy, the
closest to beam search) and matches the teacher's full next-token distribution at each
position, which has the same minimiser and less variance when the teacher is white-box.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import teacher
from opd.signals import Divergence


@recipe(
    citation="Kim & Rush, Sequence-Level Knowledge Distillation, EMNLP 2016",
    summary="teacher writes y; KL(p_teacher ‖ q_student) per token (off-policy)",
    signal="logit",
    access="white-box",
    granularity="sequence",
)
def seqkd(temperature: float = 1.0):
    """Sequence-level KD on teacher samples."""
    return Method(prefixes=teacher(), signal=Divergence("forward_kl", {}, temperature))
