"""Multi-teacher ensemble distillation (survey eq. 31): p = Σ_k w_k p_k.

The student writes y (on-policy) and minimises a divergence to the weighted mixture of
several teachers' next-token distributions, computed in row chunks without any (N, V)
tensor (`opd.losses.mixture`). Teachers are given on the command line:
`model.teacher=A,B model.teacher_weights=0.7,0.3` (equal weights by default); every member
must share the student's tokenizer. Deviations: the survey leaves the divergence open; the
default is KL(q_student ‖ p_mixture), and `divergence=` picks any other.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import student
from opd.signals import Divergence
from opd.teachers import FullLogits


@recipe(
    citation="Survey of on-policy distillation, eq. 31 (multi-teacher ensembles)",
    summary="student writes y; divergence to the weighted mixture of several teachers",
    signal="logit",
    access="white-box",
    granularity="token",
)
def multi_teacher(divergence: str = "reverse_kl", temperature: float = 1.0):
    """On-policy distillation from a teacher ensemble (needs model.teacher=A,B,...)."""
    return Method(
        prefixes=student(),
        teacher=FullLogits(ensemble=True),
        signal=Divergence(divergence, {}, temperature),
    )
