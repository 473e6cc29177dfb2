"""DistiLLM-2 (Ko et al., ICML 2025): a contrastive pair of skew KLs by who wrote y.

On teacher-written completions: skew KL(p_teacher ‖ α·p + (1−α)·q_student) (SKL), which
raises the student's likelihood of the teacher's responses; on student-written completions:
skew KL(q_student ‖ (1−α)·p + α·q) (SRKL), which lowers the likelihood of its own poor ones
(α = 0.1). Prefix source: `mix(student=λ, other="teacher")`: each batch is written by the
student with probability λ = 0.5, else by the teacher; `ByWriter` picks the loss.
Deviations: the paper pairs a teacher and a student response for every prompt in each batch
(loss = SKL + SRKL, responses generated before each training round); opd draws one writer per
batch, which matches that sum in expectation (× ½) with on-line samples. The paper's
curriculum-based adaptive α (which only lowers α below 0.1 per example) is not implemented:
α is fixed.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import mix
from opd.schedules import ByWriter
from opd.signals import Divergence


@recipe(
    citation="Ko et al., DistiLLM-2: A Contrastive Approach Boosts the Distillation of LLMs, "
    "ICML 2025",
    summary="teacher- or student-written y per batch; skew forward KL on teacher outputs, "
    "skew reverse KL on student outputs",
    signal="logit",
    access="white-box",
    granularity="token",
)
def distillm2(alpha: float = 0.1, lmbda: float = 0.5, temperature: float = 1.0):
    """DistiLLM-2 with skew `alpha` and student-writer probability `lmbda`."""
    return Method(
        prefixes=mix(student=lmbda, other="teacher"),
        signal=ByWriter(
            (
                ("teacher", Divergence("skew_forward_kl", {"alpha": alpha}, temperature)),
                ("student", Divergence("skew_reverse_kl", {"alpha": alpha}, temperature)),
            )
        ),
        name="distillm2",
    )
