"""NaN/inf stops a run at the step where it appears, one family of recipes at a time.

A teacher with one NaN weight, resumed after two good checkpoints: the run stops at step 3
with a `NonFiniteError` naming the step and the likely cause, writes no `student/` folder and
leaves the earlier checkpoints byte for byte as they were.
"""

from __future__ import annotations

import pytest
import torch

from opd.build import finish_models
from opd.step import NonFiniteError
from opd.teachers.ensemble import TeacherEnsemble
from opd.tiny import tiny_llama
from opd.train import distill
from tests.helpers import (
    assert_clean_error,
    fresh_models,
    run_opd,
    save_tiny_models,
    small_cli_args,
    tiny_cfg,
    tree_digest,
)

QUIET = dict(log=lambda *_: None)


def _poison(model) -> None:
    """One NaN in the first decoder layer's MLP: every later hidden state becomes NaN."""
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")


def _ensemble(tok):
    t1 = tiny_llama(len(tok), hidden=64, layers=3, seed=11)
    t2 = tiny_llama(len(tok), hidden=32, layers=2, seed=21)
    return finish_models(TeacherEnsemble([t1, t2]), tiny_llama(len(tok), 48, 2, seed=12), tok)


FAMILIES = [
    ("gkd", "full-logit divergence (generalized JSD)"),
    ("supervised_kd", "full-logit divergence, dataset completions"),
    ("revisiting_opd", "top-k teacher access, token weights"),
    ("sampled_rkl", "sampled teacher log-probs"),
    ("minillm", "sequence-level policy gradient, teacher-mixed sampling"),
    ("akl", "token-weighted adaptive divergence"),
    ("multi_teacher", "teacher ensemble"),
]


@pytest.mark.parametrize("recipe", [f[0] for f in FAMILIES])
def test_nan_teacher_stops_at_the_step_and_keeps_checkpoints(tmp_path, prompt_file, tok, recipe):
    make = _ensemble if recipe == "multi_teacher" else fresh_models
    opts = ("train.steps=5", "train.checkpoint_every=1", f"method.recipe={recipe}")
    distill(tiny_cfg(tmp_path, prompt_file, *opts), models=make(tok), stop_after=2, **QUIET)
    run = tmp_path / "run"
    before = tree_digest(run / "checkpoints")
    assert {p for p in before if p.endswith("state.json")} == {
        "step_000001/state.json",
        "step_000002/state.json",
    }
    models = make(tok)
    members = getattr(models.teacher, "members", [models.teacher])
    _poison(members[0])
    with pytest.raises(
        NonFiniteError, match=r"^step 3: .*(not finite|non-finite).*likely cause"
    ) as err:
        distill(tiny_cfg(tmp_path, prompt_file, *opts), models=models, resume=True, **QUIET)
    assert "\n" not in str(err.value)
    assert not (run / "student").exists()
    assert tree_digest(run / "checkpoints") == before


def test_non_finite_student_is_never_saved(tmp_path, prompt_file, tok):
    """A student that is already non-finite (resumed, say) is caught before any save."""
    models = fresh_models(tok)
    with torch.no_grad():
        models.student.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=2", "method.recipe=gkd")
    with pytest.raises(NonFiniteError, match="step 1"):
        distill(cfg, models=models, **QUIET)
    assert not (tmp_path / "run" / "student").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_nan_teacher_is_a_clean_error(tmp_path, prompt_file):
    from transformers import AutoModelForCausalLM

    t, s = save_tiny_models(tmp_path / "models")
    teacher = AutoModelForCausalLM.from_pretrained(t)
    _poison(teacher)
    teacher.save_pretrained(t)
    res = run_opd(["distill", *small_cli_args(tmp_path, (t, s), prompt_file), "method.recipe=gkd"])
    assert_clean_error(res, "step 1", "not finite", "teacher")
    assert not (tmp_path / "run" / "student").exists()


def test_float16_training_is_refused_before_the_run_folder(tmp_path, prompt_file):
    t, s = save_tiny_models(tmp_path / "models")
    res = run_opd(
        ["distill", *small_cli_args(tmp_path, (t, s), prompt_file), "model.dtype=float16"]
    )
    assert_clean_error(res, "float16", "bfloat16")
    assert not (tmp_path / "run").exists()


def test_learning_rate_too_high_is_named(tmp_path, prompt_file, tok):
    """lr=1e30: the first step's update makes the student overflow; the run stops at the
    next step naming the learning rate, and the checkpoint of step 1 stays finite."""
    cfg = tiny_cfg(
        tmp_path,
        prompt_file,
        "train.steps=4",
        "train.lr=1e30",
        "train.checkpoint_every=1",
        "method.recipe=gkd",
    )
    with pytest.raises(
        NonFiniteError, match=r"^step 2: .*learning rate too high \(train.lr=1e\+30\)"
    ):
        distill(cfg, models=fresh_models(tok), **QUIET)
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert saved == ["step_000001"]
    assert not (tmp_path / "run" / "student").exists()


def test_sampling_errors_other_than_nan_keep_their_traceback():
    """Only NaN/inf sampling failures become NonFiniteError ('inference' is no match)."""
    from opd.step import _rollout

    class Boom:
        prompts = None

        class prefixes:  # noqa: N801
            @staticmethod
            def rollout(examples, ctx):
                raise RuntimeError("Inference tensors cannot be saved for backward")

    with pytest.raises(RuntimeError, match="Inference"):
        _rollout(Boom, iter([[1]]), None, 0)
