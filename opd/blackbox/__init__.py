"""Black-box distillation: the teacher returns only text or a score, never log-probs.

    TextOnly        a teacher access that asks the teacher for nothing it scores (it may
                    still write: the prefix source or the judge runs its `generate`)
    ORPO            the odds-ratio preference loss on (teacher's response, student's response)
                    pairs (`opd.blackbox.orpo`); the loss needs only the student's log-probs
    VerbalJudge     the teacher grades each student completion with a 0–9 score through a
                    judge prompt; the scores are rewards for the GRPO core
                    (`opd.blackbox.judge`)
    GAD             a discriminator (student copy + scalar head, BT loss) whose score of the
                    student's samples is the GRPO reward (`opd.blackbox.gad`)
    TextNLL         −log q_student of the teacher's written tokens (`opd.blackbox.imitation`)
    LionPool        Lion's imitate → discriminate → generate rounds as a growing prompt pool
                    (`opd.blackbox.lion`)

See docs/black-box.md.
"""

from opd.blackbox.gad import GAD
from opd.blackbox.imitation import TextNLL
from opd.blackbox.judge import DEFAULT_JUDGE_TEMPLATE, OVD, TextOnly, parse_score
from opd.blackbox.lion import LionPool
from opd.blackbox.orpo import ORPO, log_odds, orpo_pair_loss

__all__ = [
    "DEFAULT_JUDGE_TEMPLATE",
    "GAD",
    "LionPool",
    "OVD",
    "ORPO",
    "TextNLL",
    "TextOnly",
    "log_odds",
    "orpo_pair_loss",
    "parse_score",
]
