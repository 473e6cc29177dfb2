"""On-policy distillation from a teacher's top-k log-probabilities (a served teacher's view).

The student writes y; the teacher returns, per completion token, its k most likely tokens
and their log-probabilities (`opd.teachers.TopK`: what vLLM's `prompt_logprobs=k` and SGLang's
`top_logprobs_num=k` give), plus the tail bucket 1 − Σ_top-k p. The student's distribution is
collapsed onto the same k + 1 buckets and the loss is a divergence between the two, by default
KL(q̂_student ‖ p̂_teacher) (`opd.signals.TopKDivergence`):

    D_t = Σ_{b ∈ top-k ∪ {tail}} q̂_b log(q̂_b / p̂_b)

By the chain rule of KL, D_t ≤ KL(q_student ‖ p_teacher) over the full vocabulary, with
equality for k = V. It is the full-vocabulary on-policy reverse KL (`on_policy_rkl`) made
servable: k + 1 numbers per token instead of V. `lmbda` < 1 (GKD's mixture, `opd.sampling.mix`):
with probability 1 − λ a batch uses the rows' reference completions instead; λ = 0 is the
off-policy form an offline teacher cache serves (`opd cache-teacher`, docs/teacher-cache.md).

Deviation: published top-k distillation (e.g. the "revisiting OPD" recipe) renormalises both
models on the top-k support and drops the tail; this recipe keeps the tail bucket, the form
that stays a proper divergence between two distributions and that a served teacher can give.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import mix, student
from opd.signals import TopKDivergence
from opd.teachers import TopK


@recipe(
    citation="Agarwal et al., ICLR 2024 (on-policy, λ=1); top-k + tail form for served teachers",
    summary="student writes y; KL(q̂_student ‖ p̂_teacher) on the teacher's top-k + tail buckets",
    signal="top-k log-prob",
    access="top-k",
    granularity="token",
)
def topk_rkl(
    k: int = 20, divergence: str = "reverse_kl", temperature: float = 1.0, lmbda: float = 1.0
):
    """On-policy divergence on the teacher's top-k + tail buckets (works with served teachers)."""
    return Method(
        prefixes=student() if lmbda == 1.0 else mix(student=lmbda, other="dataset"),
        teacher=TopK(k=k, temperature=temperature),
        signal=TopKDivergence(divergence, k=None, temperature=temperature),
    )
