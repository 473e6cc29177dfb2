"""GAD (Ye et al., 2025): the student as a generator against a discriminator that tells the
teacher's text from the student's; the discriminator's score is the student's reward.

Each step the rollout holds, for each of B prompts x_b, the teacher's response y_t,b (a local
teacher's `generate`: text only) and G student samples y_s,b,1..G
(`Paired((teacher(), Grouped(student(), G)))`: rows [0, B) the teacher's, then the student's
in groups of G). The discriminator D (`opd.blackbox.discriminator`: a copy of the student's
decoder with a scalar head on the last non-pad token) scores every row, then

    discriminator:  min_D  mean_{b,i} −log σ(D(x_b, y_t,b) − D(x_b, y_s,b,i))      (BT loss)
    student:        max    E[D(x, y_s)] with the GRPO core: r_b,i = D(x_b, y_s,b,i),
                    A = (r − mean_g r)/(std_g r + ε), per token −min(ρ·A, clip(ρ)·A), π_old = π_θ

Both use the scores of the same forward pass (the discriminator before its update); the
discriminator's gradient is accumulated over the step's micro-batches and applied, divided by
the step's pair count, after the student's optimizer step (`after_optimizer_step`), with its
own AdamW (constant `disc_lr`, gradient clipped to `disc_max_grad_norm`).

Warm-up (steps < `warmup_steps`, as the paper): the discriminator trains the same way, and the
student is fine-tuned on the teacher's responses (−log q_student(y_t), `warmup_sft`); with
`warmup_sft=false` only the discriminator trains (the student's values are 0).

Reduction: the loop's "sequence_mean" (GRPO's 1/|o_i| per response). The rows that do not
train at a stage (the teacher's after warm-up, the student's during it) carry 0; the values
of the training rows are multiplied by (non-empty rows)/(non-empty training rows) of the
micro-batch, so the loss is the mean over the training responses.

State (checkpointed in components.safetensors, restored exactly): the discriminator's weights,
its optimizer state and the update count.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from opd.blackbox.discriminator import (
    Discriminator,
    bt_loss,
    load_optimizer_state,
    optimizer_state,
)
from opd.errors import ConfigError
from opd.rl.grpo import SCALES, group_advantages, grpo_token_loss
from opd.signals.tokens import student_token_logprobs


def split_rows(writers, group_size: int) -> tuple[list[int], list[int], list[int]]:
    """(teacher rows, student rows, the teacher row paired with each student row)."""
    t_rows = [b for b, w in enumerate(writers) if w == "teacher"]
    s_rows = [b for b, w in enumerate(writers) if w == "student"]
    if not t_rows or len(s_rows) != group_size * len(t_rows):
        raise ConfigError(
            f"gad needs one teacher row and {group_size} student rows per prompt "
            "(prefixes=Paired((teacher(), Grouped(student(), G)))); got writers "
            f"{sorted(set(writers)) or 'none'} ({len(t_rows)} teacher, {len(s_rows)} student rows)"
        )
    return t_rows, s_rows, [t_rows[i // group_size] for i in range(len(s_rows))]


class GAD:
    """The GAD signal: discriminator update + GRPO on its scores (module doc).

    Attributes:
      group_size: G, student samples per prompt.
      warmup_steps: optimizer steps of the warm-up stage.
      warmup_sft: during warm-up, fine-tune the student on the teacher's responses.
      disc_lr, disc_weight_decay, disc_max_grad_norm: the discriminator's AdamW settings.
      scale: "std" (GRPO) or "none" (Dr. GRPO) advantages.
      eps_low, eps_high: the clip band (eps_high 0: = eps_low).
    """

    requires: ClassVar[frozenset] = frozenset()
    logs: ClassVar[frozenset] = frozenset(
        {"reward_mean", "gad_disc_loss", "gad_disc_accuracy", "gad_teacher_score", "gad_warmup"}
    )

    def __init__(
        self,
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
        if group_size < 1 or warmup_steps < 0:
            raise ConfigError("gad: group_size must be >= 1 and warmup_steps >= 0")
        if not disc_lr > 0 or disc_weight_decay < 0 or disc_max_grad_norm < 0:
            raise ConfigError(
                "gad: disc_lr must be > 0, disc_weight_decay and disc_max_grad_norm >= 0"
            )
        if scale not in SCALES:
            raise ConfigError(f"gad: scale {scale!r}; valid: {', '.join(SCALES)}")
        if eps_low < 0 or eps_high < 0:
            raise ConfigError("gad: eps_low and eps_high must be >= 0")
        self.group_size, self.warmup_steps, self.warmup_sft = group_size, warmup_steps, warmup_sft
        self.disc_lr, self.disc_weight_decay = disc_lr, disc_weight_decay
        self.disc_max_grad_norm = disc_max_grad_norm
        self.scale, self.eps_low, self.eps_high = scale, eps_low, eps_high
        self.disc: Discriminator | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.updates = 0  # discriminator optimizer steps so far
        self._pairs, self._acc_step = 0, None  # pairs whose gradient is accumulated, and when

    # --- loop hooks ------------------------------------------------------------------------------
    def prepare(self, models) -> None:
        """Copy the student's decoder into a fresh discriminator with its own AdamW."""
        self.disc = Discriminator(models.student)
        self.disc.train()
        self.optimizer = torch.optim.AdamW(
            self.disc.parameters(), lr=self.disc_lr, weight_decay=self.disc_weight_decay
        )
        self.updates, self._pairs, self._acc_step = 0, 0, None

    def _ready(self) -> Discriminator:
        if self.disc is None:
            raise RuntimeError("GAD.prepare(models) was not called")
        return self.disc

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Apply the step's accumulated discriminator gradient (mean over its pairs)."""
        if not self._pairs:
            return
        params = [p for p in self._ready().parameters() if p.grad is not None]
        for p in params:
            p.grad.div_(self._pairs)
        if self.disc_max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.disc_max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._pairs, self._acc_step = 0, None
        self.updates += 1

    def state_dict(self) -> dict:
        """Update count, weights and optimizer state (tensors by reference: the checkpoint
        writes them into components.safetensors)."""
        disc = self._ready()
        return {
            "updates": self.updates,
            "weights": {n: t.detach() for n, t in disc.state_dict().items()},
            "optimizer": optimizer_state(self.optimizer),
        }

    def load_state_dict(self, state: dict) -> None:
        disc = self._ready()
        if "weights" not in state or "optimizer" not in state:
            raise ConfigError(
                "the checkpoint's gad state has no discriminator; resume with the recipe the "
                "run was started with"
            )
        own = disc.state_dict()
        with torch.no_grad():
            for name, value in state["weights"].items():
                own[name].copy_(value.to(own[name].device, own[name].dtype))
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.updates = int(state.get("updates", 0))
        self._pairs, self._acc_step = 0, None

    # --- the signal ------------------------------------------------------------------------------
    def discriminate(self, rollout, ctx) -> Tensor:
        """(B,) detached scores of every row; the BT loss's gradient is accumulated."""
        disc = self._ready()
        if self._acc_step != ctx.step:  # a new optimizer step (or a step begun again)
            self.optimizer.zero_grad(set_to_none=True)
            self._pairs, self._acc_step = 0, ctx.step
        t_rows, s_rows, pair_of = split_rows(rollout.row_writers, self.group_size)
        with torch.enable_grad():
            scores_B = disc(rollout.input_ids_BL, rollout.attention_mask_BL)
            loss_P = bt_loss(scores_B[pair_of], scores_B[s_rows])
            total = loss_P.sum()
            if not bool(torch.isfinite(total.detach())):
                from opd.step import NonFiniteError

                raise NonFiniteError(
                    f"step {ctx.step + 1}: gad's discriminator loss is not finite "
                    f"({float(total.detach())}); likely cause: disc_lr too high"
                )
            total.backward()
        self._pairs += len(s_rows)
        s = scores_B.detach()
        ctx.log("gad_disc_loss", loss_P.detach().mean())
        ctx.log("gad_disc_accuracy", (s[pair_of] > s[s_rows]).double().mean())
        ctx.log("gad_teacher_score", s[t_rows].mean())
        return s

    def __call__(self, student, teacher, ctx) -> Tensor:
        rollout = ctx.rollout
        if rollout is None:
            raise ConfigError("gad needs ctx.rollout (the teacher's and student's rows)")
        scores_B = self.discriminate(rollout, ctx)
        t_rows, s_rows, _ = split_rows(rollout.row_writers, self.group_size)
        logq_N = student_token_logprobs(student, ctx)
        row_N = student.row_index_N
        nonempty_B = (rollout.completion_mask_BT.sum(dim=1) > 0).to(logq_N.device)
        warm = ctx.step < self.warmup_steps
        ctx.log("gad_warmup", float(warm))
        r_S = scores_B[s_rows].to(device=logq_N.device, dtype=logq_N.dtype)
        ctx.log("reward_mean", r_S.mean())
        if warm and not self.warmup_sft:
            return logq_N * 0.0  # only the discriminator trains
        train_B = torch.zeros(len(rollout.row_writers), dtype=torch.bool, device=logq_N.device)
        train_B[t_rows if warm else s_rows] = True
        n_train = int((train_B & nonempty_B).sum())
        factor = int(nonempty_B.sum()) / n_train if n_train else 0.0
        if warm:
            values_N = -logq_N
        else:
            adv_B = torch.zeros(train_B.shape, dtype=logq_N.dtype, device=logq_N.device)
            adv_B[s_rows] = group_advantages(r_S, self.group_size, self.scale)
            values_N = grpo_token_loss(
                logq_N,
                logq_N.detach(),  # one update per rollout: π_old = π_θ
                adv_B[row_N],
                eps_low=self.eps_low,
                eps_high=self.eps_high or None,
            )
        return torch.where(train_B[row_N], values_N * factor, torch.zeros_like(values_N))

    def describe(self) -> str:
        adv = "(r − mean)/(std + ε)" if self.scale == "std" else "r − mean (Dr. GRPO)"
        warm = "SFT on the teacher's text" if self.warmup_sft else "the student frozen"
        return (
            f"GAD: discriminator (student decoder copy + scalar head, BT loss, AdamW lr "
            f"{self.disc_lr}); student: GRPO clipped surrogate, G={self.group_size}, A = {adv}, "
            f"reward D(x, y_student); {self.warmup_steps} warm-up steps ({warm})"
        )
