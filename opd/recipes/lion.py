"""Lion (Jiang et al., 2023, "Lion: Adversarial Distillation of Proprietary Large Language
Models", EMNLP 2023, arXiv 2305.12870): the imitate → discriminate → generate loop.

The student imitates the teacher's responses (text only: −log q_student of the teacher's
tokens) on instructions drawn from a pool; every `round_steps` steps the newest instructions
are judged (the task's verifier where a reference answer exists, else the teacher as referee
with a verbal 0–9 score) and the teacher writes new, harder instructions from the hard ones
(`writer`, an import path; default: the teacher's `generate` on a template). The pool grows
each round and is checkpointed (`opd.blackbox.lion`).

Deviations:
- One run with rounds (a growing prompt pool inside `opd distill`), not separate fine-tuning
  runs per iteration; the optimizer, schedule and student carry over between rounds.
- Imitation draws uniformly from the whole pool (initial + generated) at every step; Lion
  keeps a separate train pool per iteration (details not re-checked against the paper).
- The referee scores only the student's answer against the teacher's (one digit, first digit
  parsed); as we read the paper, Lion's referee scores both answers and thresholds their
  difference. Only hard instructions seed new ones (Lion also writes new instructions from
  easy ones, for diversity). Instructions with a reference answer are judged by the verifier.
- The templates are opd's own wording, not the paper's prompts.
"""

from opd.blackbox import TextOnly
from opd.blackbox.lion import DEFAULT_WRITER, LionNLL, LionPool
from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import teacher


@recipe(
    citation="Jiang et al., Lion: Adversarial Distillation of Proprietary Large Language Models, "
    "EMNLP 2023 (arXiv 2305.12870)",
    summary="rounds of: imitate the teacher's text on a prompt pool; find the instructions the "
    "student fails; the teacher writes harder ones into the pool",
    signal="text",
    access="black-box",
    granularity="sequence",
)
def lion(
    round_steps: int = 50,
    judge_count: int = 16,
    new_per_round: int = 8,
    judge: str = "auto",
    threshold: int = 7,
    writer: str = DEFAULT_WRITER,
    max_new_tokens: int = 64,
):
    """Lion's loop with a round every `round_steps` steps."""
    pool = LionPool(
        round_steps, judge_count, new_per_round, judge, threshold, writer, max_new_tokens
    )
    return Method(prompts=pool, prefixes=teacher(), teacher=TextOnly(), signal=LionNLL(pool))
