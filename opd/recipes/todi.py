"""ToDi: Token-wise Distillation via Fine-Grained Divergence Control (Jung et al., EMNLP 2025).

Per vocabulary entry v, a detached gate a_v = sigmoid(β·(log p_v − log q_v)) mixes the two KL
directions (p = teacher, q = student):

    ToDi_t = Σ_v [ a_v · p_v (log p_v − log q_v) + (1 − a_v) · q_v (log q_v − log p_v) ]

where the student underestimates an entry (p_v > q_v) the KL(p_teacher ‖ q_student) term
dominates, where it overestimates, the KL(q_student ‖ p_teacher) term. Computed by
`opd.losses.todi`.

Deviations: ToDi was evaluated off-policy (training on dataset responses); the survey notes
the gate is orthogonal to the sampling strategy, and opd is an on-policy library, so the
default prefix source is the student (`prefixes="student"`). `prefixes="dataset"` is the
paper's setting; "mix" is GKD-style mixing with `lmbda`.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.signals import Divergence, prefix_source


@recipe(
    citation="Jung et al., ToDi: Token-wise Distillation via Fine-Grained Divergence Control, "
    "EMNLP 2025",
    summary="per-entry sigmoid gate between KL(p‖q) and KL(q‖p), on student rollouts",
    signal="logit",
    access="white-box",
    granularity="token",
)
def todi(
    beta: float = 1.0, temperature: float = 1.0, prefixes: str = "student", lmbda: float = 0.5
):
    """ToDi with gate sharpness `beta` (β=1 is the paper's form a_v = p_v / (p_v + q_v))."""
    return Method(
        prefixes=prefix_source(prefixes, lmbda),
        signal=Divergence("todi", {"beta": beta}, temperature),
    )
