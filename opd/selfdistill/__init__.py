"""Self-distillation: the student is its own teacher, under a privileged prompt.

    context.py   the teacher's prompt: the row's privileged field (context, solution, feedback,
                 demonstration) added to the prompt by a template; `PrivilegedPrompts`, a prefix
                 source wrapper that puts those prompts on the rollout
    teachers.py  `SelfTeacher`, views of the student (frozen, live, ema, adapter_off)
                 implementing the Teacher interface, and `SelfAccess`, the access mode that
                 scores with it
    gates.py     GATES' consensus gate over k samples of the context-conditioned self
    hdpo.py      HDPO's privileged rollouts for prompts where every sample fails, and its
                 hybrid GRPO + JSD_β loss
    spin.py      SPIN's opponent (the previous iterate, checkpointed) and its self-play loss

See docs/self-distillation.md.
"""

from opd.selfdistill.context import TEMPLATE, PrivilegedPrompts, teacher_prompt_ids
from opd.selfdistill.teachers import VIEWS, SelfAccess, SelfTeacher, teacher_view

__all__ = [
    "TEMPLATE",
    "VIEWS",
    "PrivilegedPrompts",
    "SelfAccess",
    "SelfTeacher",
    "teacher_prompt_ids",
    "teacher_view",
]
