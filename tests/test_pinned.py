"""Pinned loss curves: three float64 training steps of three recipes, to the 8th digit.

Every number below is the loss of one optimizer step of `opd.train.distill` on tiny float64
models (teacher 3 × 64, student 2 × 48, character vocabulary, seeds 11 / 12), the 24-row
addition prompt file of `tests.helpers.write_prompts`, `tiny_cfg`'s settings (batch 4, 6 new
tokens, lr 3e-3), `train.seed=0`, `grad_accum=1`, 3 steps, one torch thread. The recipes
cover the three writers of a rollout: `gkd` (a per-step coin between the student's samples
and the dataset's completions, generalized JSD β = 0.5), `on_policy_rkl` (the student's
samples, KL(q_student ‖ p_teacher)) and `supervised_kd` (the dataset's completions,
KL(p_teacher ‖ q_student)). Sampling, the divergences, the reduction, clipping, AdamW and
the learning-rate schedule all enter step 2 and 3 (the habit of torchtune's recipe tests).

The purpose is to make any change to the math visible. If a test here fails, either the
change was not meant to alter the numbers (then it is a bug), or it was: then regenerate
the numbers with

    PYTHONPATH=. python -m tests.test_pinned

paste them into `PINNED`, and explain in the commit message which change moved them and
why the new numbers are right.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch

from opd.build import finish_models
from opd.tiny import char_tokenizer, tiny_llama
from opd.train import distill
from tests.helpers import tiny_cfg, write_prompts

PINNED = {
    "gkd": [0.005601371986148403, 0.0036593827598907693, 0.0035531882951910223],
    "on_policy_rkl": [0.02254549012999446, 0.01701734927517489, 0.014166415993050819],
    "supervised_kd": [0.020591680500793835, 0.01388175616723216, 0.010884342280985572],
}
REL_TOL = 1e-8


def pinned_losses(recipe: str, folder: Path) -> list[float]:
    """The three per-step losses of `recipe` in the pinned float64 setting."""
    torch.set_num_threads(1)
    tok = char_tokenizer()
    teacher = tiny_llama(len(tok), hidden=64, layers=3, seed=11).double()
    student = tiny_llama(len(tok), hidden=48, layers=2, seed=12).double()
    models = finish_models(teacher, student, tok)
    prompts = write_prompts(folder / "prompts.jsonl")
    cfg = tiny_cfg(
        folder,
        prompts,
        "train.steps=3",
        "train.grad_accum=1",
        "train.seed=0",
        f"method.recipe={recipe}",
    )
    res = distill(cfg, models=models, evaluate=False, log=lambda *_: None)
    assert next(res.models.student.parameters()).dtype == torch.float64
    return res.losses


@pytest.mark.parametrize("recipe", sorted(PINNED))
def test_pinned_three_step_loss_curve(recipe, tmp_path):
    losses = pinned_losses(recipe, tmp_path)
    assert len(losses) == 3
    for step, (got, want) in enumerate(zip(losses, PINNED[recipe]), start=1):
        assert math.isclose(got, want, rel_tol=REL_TOL, abs_tol=0.0), (
            f"{recipe} step {step}: loss {got!r}, pinned {want!r} "
            f"(relative change {abs(got - want) / want:.2e}); see this file's docstring"
        )


def test_pinned_curves_are_training_curves():
    # The pins are not degenerate: each curve is positive and falls step by step.
    for recipe, losses in PINNED.items():
        assert all(x > 0 for x in losses), recipe
        assert losses[0] > losses[1] > losses[2], recipe


if __name__ == "__main__":
    for name in sorted(PINNED):
        with tempfile.TemporaryDirectory() as tmp:
            print(f"    {name!r}: {pinned_losses(name, Path(tmp))!r},")
