"""Cross-tokenizer white-box on-policy distillation in the spirit of ULD and GOLD.

ULD: Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs" (arXiv 2402.12030). GOLD: Patiño et al. 2025, "Unlocking
On-Policy Distillation for Any Model Family" (Hugging Face; TRL `GOLDTrainer`).

The student writes y; the teacher (another tokenizer) scores its own tokenisation of the same
text; both tokenisations are grouped into spans ending at shared byte boundaries, and at each
span's first position (both models condition on the same text there) the loss is

    matched_weight · D(p̃_teacher, q̃_student) on the tokens whose bytes match exactly in both
    vocabularies (each side renormalised over them)  +  uld_weight · Σ_i |sort↓(q_rest)_i −
    sort↓(p_rest)_i| on the unmatched remainder (ULD's sorted-probability L1)

(opd.crosstok.uld, opd.crosstok.gold). With identical tokenizers every span is one token,
every id is matched, and the recipe is full-vocabulary `divergence` distillation on student
samples (on_policy_rkl for the default reverse_kl).
Deviations:
- The matched part renormalises both sides over the matched tokens and defaults to reverse KL
  (any opd divergence can be named, e.g. divergence=generalized_jsd); TRL's GOLD takes the
  generalized JSD (β = 0.5) on the raw, unrenormalised matched probabilities.
- Fixed weights matched_weight = uld_weight = 1 instead of TRL's adaptive split (the matched
  share M/U of the teacher vocabulary and 1 − M/U); no cross-entropy term (ULD's paper adds
  CE with λ = 1.5 on the distillation part; GOLD's default CE weight is 0).
- One temperature for both models (ULD and GOLD allow one per model).
- A span of several tokens gives one pair (its first student and first teacher position);
  GOLD instead multiplies the first position's distribution by the probabilities of the
  span's later tokens. The span's other student tokens get no signal (counted in
  gold_masked_tokens); span_rule=one_to_one keeps only one-token-each spans.
- Vocabularies are matched on the bytes each token stands for (so "Ġthe" matches "▁the"),
  not on raw vocabulary strings as in TRL.
"""

from opd.crosstok.gold import GoldSignal, SpanLogits
from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import student


@recipe(
    citation=(
        "Patiño et al., Unlocking On-Policy Distillation for Any Model Family (GOLD), 2025; "
        "Boizard et al., Universal Logit Distillation Loss (ULD), arXiv 2402.12030, 2024"
    ),
    summary=(
        "cross-tokenizer: divergence on exactly matching tokens + ULD sorted-probability L1 on "
        "the rest, at aligned span starts of student samples"
    ),
    signal="logit",
    access="white-box",
    granularity="token",
)
def xtok_gold(
    temperature: float = 1.0,
    matched_weight: float = 1.0,
    uld_weight: float = 1.0,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    span_rule: str = "first",
):
    """GOLD-style white-box distillation between models with different tokenizers.

    `beta` is passed to divergences that take it (generalized_jsd, skew_*), ignored otherwise.
    """
    from opd.losses.divergences import divergence_params

    params = {"beta": beta} if "beta" in divergence_params(divergence) else {}
    return Method(
        prefixes=student(),
        teacher=SpanLogits(span_rule=span_rule),
        signal=GoldSignal(
            temperature=temperature,
            matched_weight=matched_weight,
            uld_weight=uld_weight,
            divergence=divergence,
            params=params,
        ),
    )
