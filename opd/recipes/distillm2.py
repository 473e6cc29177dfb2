"""DistiLLM-2 (Ko et al., ICML 2025): a contrastive pair of skew KLs by who wrote y.

For every prompt both the teacher and the student write a response (`Paired`). On the
teacher's response: skew KL(p_teacher ‖ α·p + (1−α)·q_student) (SKL), which raises the
student's likelihood of the teacher's responses; on the student's response: skew
KL(q_student ‖ (1−α)·p + α·sg(q)) (SRKL with the student's share of the mixture detached, as
in the authors' code: same value as the plain SRKL, a different gradient), which lowers the
likelihood of its own poor ones (α = 0.1). Each response's loss is its token mean, then the
mean over the batch's responses (`reduction="sequence_mean"`). `paired=False` gives opd's
earlier form: one writer per batch (the student with probability `lmbda`), plain SRKL
gradient, token mean; in expectation that is ½·(SKL + SRKL).

Deviations:
- The loss is the mean over the 2B responses, ½·(SKL + SRKL) per prompt; the paper's is the
  sum SKL + SRKL, twice ours (a constant factor: with AdamW it only matters through
  gradient clipping and weight decay).
- Responses are generated on-line at every step, not once per training round.
- The paper's curriculum-based adaptive α (which only lowers α below 0.1 per example) is not
  implemented: α is fixed.
- The SKL's student share keeps its gradient (not verified against the authors' code).
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import mix, student, teacher
from opd.signals import ByWriter, Divergence, Paired


@recipe(
    citation="Ko et al., DistiLLM-2: A Contrastive Approach Boosts the Distillation of LLMs, "
    "ICML 2025",
    summary="teacher and student answer each prompt; skew forward KL on the teacher's answer, "
    "skew reverse KL (stop-gradient mixture) on the student's, per-sequence mean",
    signal="logit",
    access="white-box",
    granularity="token",
)
def distillm2(
    alpha: float = 0.1, temperature: float = 1.0, paired: bool = True, lmbda: float = 0.5
):
    """DistiLLM-2 with skew `alpha`; `paired=False` draws one writer per batch (`lmbda`)."""
    skl = Divergence("skew_forward_kl", {"alpha": alpha}, temperature)
    if not paired:
        return Method(
            prefixes=mix(student=lmbda, other="teacher"),
            signal=ByWriter(
                (
                    ("teacher", skl),
                    ("student", Divergence("skew_reverse_kl", {"alpha": alpha}, temperature)),
                )
            ),
        )
    srkl = Divergence("skew_reverse_kl", {"alpha": alpha, "stop_grad_mix": True}, temperature)
    return Method(
        prefixes=Paired((teacher(), student())),
        signal=ByWriter((("teacher", skl), ("student", srkl))),
        reduction="sequence_mean",
    )
