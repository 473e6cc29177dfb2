"""OVD (Xiong et al., 2026): on-policy verbal distillation, the teacher grades the student's
trajectories with a verbal 0–9 score.

The student writes G completions per prompt; the teacher (text only: a local model's greedy
`generate`, or a chat endpoint) reads a judge prompt with the question and each completion
(`opd.blackbox.judge.DEFAULT_JUDGE_TEMPLATE`, overridable with `judge_template`) and answers
with a score; the first digit 0–9 of its answer, divided by 9, is the reward (0.5 when there
is none: a bad parse, counted as `ovd_bad_parses`). The rewards go to the GRPO core:
A = (r − mean_g r)/(std_g r + ε) per group, PPO's clipped surrogate per token.

Deviations:
- The judge is the teacher's greedy answer to the judge prompt: a local model's
  continuation, or an OpenAI-compatible chat endpoint's (model.teacher_api=openai-chat).
- The judge template is opd's own wording, not the paper's prompt (not checked against it).
- A bad parse gets the neutral reward 0.5 (the middle of the scale; our choice, the paper's
  handling was not checked); one gradient step per rollout (π_old = π_θ, the clip never
  binds); no KL to a reference.
"""

from opd.blackbox import OVD, TextOnly
from opd.blackbox.judge import DEFAULT_JUDGE_TEMPLATE
from opd.method import Method
from opd.recipes.registry import recipe
from opd.rl.parts import Grouped
from opd.sampling import student


@recipe(
    citation="Xiong et al., On-Policy Verbal Distillation (OVD), 2026",
    summary="student writes G samples per prompt; the teacher's verbal 0–9 judge score is "
    "the reward of the GRPO core (group-normalised, clipped PG)",
    signal="reward",
    access="black-box",
    granularity="sequence",
)
def ovd(
    group_size: int = 4,
    scale: str = "std",
    judge_template: str = DEFAULT_JUDGE_TEMPLATE,
    judge_max_new_tokens: int = 4,
    neutral: float = 0.5,
    eps_low: float = 0.2,
    eps_high: float = 0.0,
):
    """OVD with G = `group_size` samples per prompt, judged by the teacher."""
    return Method(
        prefixes=Grouped(student(), group_size),
        teacher=TextOnly(),
        signal=OVD(
            group_size, scale, judge_template, judge_max_new_tokens, neutral, eps_low, eps_high
        ),
    )
