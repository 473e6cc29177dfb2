"""ORPO-Distill (Singh et al., 2025) on ORPO (Hong et al., EMNLP 2024): black-box distillation
by an odds-ratio preference between the teacher's and the student's response.

For each prompt the teacher writes y_w (text only: a local model's `generate` or a chat
endpoint, `opd.teachers.chat`) and the student writes y_l (`Paired`). With P(y) the student's
length-normalised sequence probability and odds(y) = P/(1 − P), the per-pair loss is

    L = −(1/|y_w|) Σ_t log q_student(y_w,t) + λ·(−log σ(log odds(y_w) − log odds(y_l)))

with λ = 0.1 (`opd.blackbox.orpo`). The teacher is never asked for a log-probability.

Deviations:
- One teacher and one student response per prompt, generated on-line at every step (the
  on-policy variant); ORPO-Distill (arXiv 2509.25100) builds a preference set of K diverse
  teacher traces and K student traces per prompt and refreshes the student negatives with a
  mixed policy, which it reports beats both off- and on-policy negatives.
- L_SFT is each chosen response's token mean, averaged over the pairs (TRL averages the
  chosen tokens of the whole batch).
- A pair with an empty chosen or rejected response contributes zero loss (its rows still
  count in the sequence mean).
"""

from opd.blackbox import ORPO, TextOnly
from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import student, teacher
from opd.signals import Paired


@recipe(
    citation="Singh et al., ORPO-Distill, 2025 (arXiv 2509.25100); Hong et al., ORPO: Monolithic Preference "
    "Optimization without Reference Model, EMNLP 2024 (arXiv 2403.07691)",
    summary="teacher's response chosen, student's own sample rejected; NLL on the chosen plus "
    "λ·odds-ratio preference loss (student log-probs only)",
    signal="preference",
    access="black-box",
    granularity="sequence",
)
def orpo_distill(lam: float = 0.1):
    """ORPO with the teacher's text as chosen and the student's sample as rejected."""
    return Method(
        prefixes=Paired((teacher(), student())),
        teacher=TextOnly(),
        signal=ORPO(lam),
        reduction="sequence_mean",
    )
