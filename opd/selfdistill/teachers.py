"""Self-teachers: views of the student that implement the Teacher interface.

    frozen   the initial student: one copy of its weights, made once in `prepare` (before a
             checkpoint is restored, so a resumed run has the same initial student)
    live     the current student weights (no copy; scored without gradients)
    ema      θ_T ← d·θ_T + (1 − d)·θ_S after every optimizer step (`after_optimizer_step`),
             starting from the initial student; its weights are checkpointed (as tensors in
             the checkpoint's components.safetensors) and restored exactly
    adapter_off  a LoRA student (peft, model.lora_r > 0) with its adapters disabled
             (`with model.disable_adapter():`): the frozen base W, p_T = p_W, while the
             student is W + (α/r)·B·A; no weight is copied (ConfigError for a student
             without adapters)

The teacher sees a different prompt than the student: `teacher_view` rebuilds the rollout
with each row's teacher prompt (`Rollout.teacher_prompts`, left-padded to P') followed by the
SAME completion columns and completion mask, so the completion token t sits at P' + t and
the N counted tokens (and their order) are identical for teacher and student.

`SelfAccess` is the access mode a recipe names: it owns a `SelfTeacher` and scores with an
inner access (`FullLogits`, `TopK`, `SampledLogprobs`); it asks nothing of `models.teacher`
(`needs` is empty), so any external teacher the config names is left unused.

Loop hooks (opd.run_setup / opd.step): `prepare(models)` once before training, the
`Stateful` state in each checkpoint, `after_optimizer_step()` after each `optimizer.step()`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch

from opd.errors import ConfigError
from opd.sampling.backends.hf import left_pad
from opd.teachers import FullLogits
from opd.teachers.base import LocalTeacher
from opd.teachers.local import full_logit_rows
from opd.types import Rollout, TeacherScores

VIEWS = ("frozen", "live", "ema", "adapter_off")


def teacher_view(rollout: Rollout, pad_id: int) -> Rollout:
    """`rollout` with each row's teacher prompt in place of its prompt (module doc)."""
    if not rollout.teacher_prompts:
        return rollout
    ids_BP, mask_BP = left_pad(rollout.teacher_prompts, pad_id)
    P = rollout.prompt_len
    return dataclasses.replace(
        rollout,
        input_ids_BL=torch.cat([ids_BP, rollout.input_ids_BL[:, P:].cpu()], dim=1),
        attention_mask_BL=torch.cat([mask_BP, rollout.attention_mask_BL[:, P:].cpu()], dim=1),
        prompt_len=ids_BP.shape[1],
        teacher_prompts=(),
    )


class SelfTeacher:
    """The student as its own teacher: `frozen`, `live`, `ema` (decay `decay`) or
    `adapter_off` (a LoRA student's base model)."""

    provides = frozenset({"full_logits", "topk_logprobs", "token_logprobs"})

    def __init__(self, view: str = "frozen", decay: float = 0.99, chunk_size: int = 512):
        if view not in VIEWS:
            raise ConfigError(f"self-teacher view {view!r}; valid: {', '.join(VIEWS)}")
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"self-teacher ema decay must be in [0, 1), got {decay}")
        self.view, self.decay, self.chunk_size = view, decay, chunk_size
        self.model: torch.nn.Module | None = None
        self.student: torch.nn.Module | None = None
        self.pad_id = 0
        self.updates = 0  # EMA updates applied so far

    def prepare(self, models) -> None:
        """Take the student; copy it once for the `frozen` and `ema` views."""
        self.student, self.pad_id = models.student, models.pad_id
        if self.view == "adapter_off":
            from opd.models.lora import is_lora

            if not is_lora(models.student):
                raise ConfigError(
                    "self-teacher view 'adapter_off' needs a LoRA student (its base model is "
                    "the teacher), but the student has no adapters; set model.lora_r > 0 or "
                    "use another view: frozen, live, ema"
                )
        if self.view in ("live", "adapter_off"):
            self.model = models.student  # a view of the student's own weights: no copy
            return
        self.model = copy.deepcopy(models.student)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    def _ready(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError("SelfTeacher.prepare(models) was not called")
        return self.model

    def ready(self) -> torch.nn.Module:
        """The teacher's model (run it inside `scope()`); RuntimeError before `prepare`."""
        return self._ready()

    def scope(self):
        """The context the teacher runs in: adapters disabled for `adapter_off`."""
        if self.view == "adapter_off":
            return self._ready().disable_adapter()
        return contextlib.nullcontext()

    def rows(self, rollout: Rollout, vocab_size: int) -> TeacherScores:
        with self.scope():
            return full_logit_rows(self._ready(), teacher_view(rollout, self.pad_id), vocab_size)

    def logprobs(
        self, rollout: Rollout, k: int, temperature: float, vocab_size: int
    ) -> TeacherScores:
        local = LocalTeacher(self._ready(), self.chunk_size)
        with self.scope():
            return local.logprobs(teacher_view(rollout, self.pad_id), k, temperature, vocab_size)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """EMA: θ_T ← d·θ_T + (1 − d)·θ_S, parameter by parameter (other views: nothing)."""
        if self.view != "ema":
            return
        student = dict(self.student.named_parameters())
        for name, p_T in self._ready().named_parameters():
            p_T.mul_(self.decay).add_(student[name].detach().to(p_T.dtype), alpha=1 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict:
        """The view, and for `ema` the update count and the weights (tensors, by reference:
        the checkpoint writes them at once into components.safetensors)."""
        state = {"view": self.view, "updates": self.updates}
        if self.view == "ema":
            state["weights"] = {n: p.detach() for n, p in self._ready().named_parameters()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("view") != self.view:
            raise ConfigError(
                f"the checkpoint's self-teacher is {state.get('view')!r}, this run's is "
                f"{self.view!r}; resume with the recipe arguments the run was started with"
            )
        self.updates = int(state.get("updates", 0))
        if self.view == "ema":
            own = dict(self._ready().named_parameters())
            with torch.no_grad():
                for name, value in state["weights"].items():
                    own[name].copy_(value.to(own[name].device, own[name].dtype))

    def describe(self) -> str:
        if self.view == "ema":
            return f"self-teacher (EMA of the student, decay {self.decay})"
        return {
            "frozen": "self-teacher (the initial student, frozen)",
            "adapter_off": "self-teacher (the LoRA student with its adapters disabled)",
        }.get(self.view, "self-teacher (the current student, no gradient)")


class SelfAccess:
    """A teacher access mode that scores with a `SelfTeacher` through `inner`."""

    needs = frozenset()  # nothing is asked of models.teacher

    def __init__(self, view: str = "frozen", decay: float = 0.99, inner=None):
        self.inner = inner if inner is not None else FullLogits()
        self.teacher = SelfTeacher(view, decay, getattr(self.inner, "chunk_size", 512))
        self.provides = frozenset(self.inner.provides)

    def score(self, teacher, rollout: Rollout, vocab_size: int) -> TeacherScores:
        return self.inner.score(self.teacher, rollout, vocab_size)

    def prepare(self, models) -> None:
        self.teacher.prepare(models)

    def after_optimizer_step(self) -> None:
        self.teacher.after_optimizer_step()

    def state_dict(self) -> dict:
        return self.teacher.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state)

    def describe(self) -> str:
        return f"{self.inner.describe()} of the {self.teacher.describe()}"
