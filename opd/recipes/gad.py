"""GAD (Ye et al., 2025, "Black-Box On-Policy Distillation of Large Language Models", arXiv
2511.10643): generative adversarial distillation from the teacher's text alone.

The student (generator) writes G samples per prompt; the teacher writes one response (text
only: a local model's `generate`, never asked for a probability). A discriminator, a copy of
the student's decoder with a scalar head on the last token, learns with the Bradley–Terry loss
−log σ(D(x, y_teacher) − D(x, y_student)) to score the teacher's response above the student's;
the student maximises D(x, y_student) with the GRPO core (group-normalised advantages, clipped
surrogate). A warm-up stage first: the discriminator trains and the student is fine-tuned on
the teacher's responses (`opd.blackbox.gad`).

Deviations:
- The warm-up is counted in optimizer steps (`warmup_steps`), not in epochs, and runs inside
  the same run and schedule as the adversarial stage.
- One teacher response per prompt, generated on-line at every step (the paper uses a fixed
  set of teacher responses); the discriminator sees each student sample paired with it.
- The discriminator has a constant learning rate (`disc_lr`, our default 1e-5) and its own
  AdamW; its gradient is the mean over the step's pairs, applied after the student's step.
- One gradient step per rollout (π_old = π_θ, the clip never binds); no KL to a reference.
- A LoRA student's discriminator copies the whole wrapped decoder (adapters included).
"""

from opd.blackbox import GAD, TextOnly
from opd.method import Method
from opd.recipes.registry import recipe
from opd.rl.parts import Grouped
from opd.sampling import student, teacher
from opd.signals import Paired


@recipe(
    citation="Ye et al., Black-Box On-Policy Distillation of Large Language Models (GAD), 2025 "
    "(arXiv 2511.10643)",
    summary="a discriminator (student copy + scalar head) learns to prefer the teacher's text "
    "(BT loss); its score of the student's G samples is the GRPO reward; warm-up first",
    signal="reward",
    access="black-box",
    granularity="sequence",
)
def gad(
    group_size: int = 4,
    warmup_steps: int = 10,
    warmup_sft: bool = True,
    disc_lr: float = 1e-5,
    disc_weight_decay: float = 0.0,
    disc_max_grad_norm: float = 1.0,
    scale: str = "std",
    eps_low: float = 0.2,
    eps_high: float = 0.0,
):
    """GAD with G = `group_size` student samples per prompt against one teacher response."""
    return Method(
        prefixes=Paired((teacher(), Grouped(student(), group_size))),
        teacher=TextOnly(),
        signal=GAD(
            group_size,
            warmup_steps,
            warmup_sft,
            disc_lr,
            disc_weight_decay,
            disc_max_grad_norm,
            scale,
            eps_low,
            eps_high,
        ),
        reduction="sequence_mean",
    )
