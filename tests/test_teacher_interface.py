"""The teacher interface: a teacher is an object that says what it can return.

A `Remote` test teacher wraps a local model but offers only what a served teacher offers
(top-k and token log-probs), so the loop's handling of non-module teachers is tested here
without a server; the real server and client are tested in test_serve*.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from opd.build import Models
from opd.errors import ConfigError, TeacherUnreachable
from opd.recipes import get_recipe
from opd.teachers import SampledLogprobs, TopK
from opd.teachers.base import (
    OUTPUTS,
    LocalTeacher,
    Teacher,
    as_teacher,
    check_teacher_serves,
    teacher_model,
)
from opd.train import distill
from tests.helpers import fresh_models, tiny_cfg


class Remote:
    """A teacher outside this process (as seen by opd): top-k and token log-probs only."""

    provides = frozenset({"topk_logprobs", "token_logprobs"})

    def __init__(self, model, fail_on_call: int | None = None):
        self.local = LocalTeacher(model)
        self.calls, self.fail_on_call = 0, fail_on_call

    def logprobs(self, rollout, k, temperature, vocab_size):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise TeacherUnreachable("teacher http://127.0.0.1:9/ unreachable after 3 tries: boom")
        return self.local.logprobs(rollout, k, temperature, vocab_size)

    def pop_stats(self):
        return {"teacher_requests": 1.0}

    def describe(self):
        return "remote test teacher"


def _remote_models(tok, **kw):
    m = fresh_models(tok)
    return Models(Remote(m.teacher, **kw), m.student, tok, m.vocab_size)


def test_local_teacher_provides_everything_and_an_ensemble_only_full_logits(tiny_models):
    teacher, _, _ = tiny_models
    local = as_teacher(teacher)
    assert isinstance(local, LocalTeacher) and isinstance(local, Teacher)
    assert local.provides == frozenset(OUTPUTS) and local.model is teacher
    assert teacher_model(local) is teacher and teacher_model(Remote(teacher)) is None
    from opd.teachers.ensemble import TeacherEnsemble

    ens = TeacherEnsemble([teacher, teacher])
    assert as_teacher(ens).provides == {"full_logits"}
    with pytest.raises(ConfigError, match="not a teacher: str"):
        as_teacher("http://x")


def test_method_refused_when_the_teacher_cannot_serve_it_naming_both(tiny_models):
    teacher, _, _ = tiny_models
    remote = Remote(teacher)
    check_teacher_serves(get_recipe("sampled_rkl").build(), remote)  # token log-probs: fine
    check_teacher_serves(get_recipe("topk_rkl").build(), remote)  # top-k: fine
    with pytest.raises(ConfigError) as err:
        check_teacher_serves(get_recipe("on_policy_rkl").build(), remote)
    msg = str(err.value)
    assert "full_logits" in msg and "remote test teacher" in msg and "full logits" in msg
    with pytest.raises(ConfigError, match="text"):  # seqKD: the teacher must write
        check_teacher_serves(get_recipe("seqkd").build(), remote)


@pytest.mark.parametrize("access", [SampledLogprobs(), TopK(k=5, temperature=2.0)])
def test_access_modes_give_the_same_scores_through_any_teacher(tiny_models, access):
    from opd.sampling import make_rollout

    teacher, _, tok = tiny_models
    ro = make_rollout([[5, 6, 7], [8, 9]], [[3, 4, 5, 6], [7]], tok.pad_token_id, "student")
    a = access.score(teacher, ro, len(tok))
    b = access.score(Remote(teacher), ro, len(tok))
    for name in ("token_logprobs_N", "topk_ids_NK", "topk_logprobs_NK"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y), name
    assert a.token_logprobs_N.shape == (ro.num_tokens,)


def test_a_run_with_a_non_module_teacher_equals_the_local_run(tmp_path, tok, prompt_file):
    args = ("recipe=topk_rkl", "method.args.k=8", "train.steps=3")
    local = distill(tiny_cfg(tmp_path, prompt_file, *args, name="a"), models=fresh_models(tok))
    remote = distill(
        tiny_cfg(tmp_path, prompt_file, *args, name="b"), models=_remote_models(tok)
    )
    assert local.losses == pytest.approx(remote.losses, rel=1e-6, abs=1e-7)
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps and all(r["teacher_requests"] == 1.0 for r in steps)  # pop_stats logged
    evals = [r for r in rows if r.get("event") == "eval"]
    assert evals and all(r["heldout_kl"] is None for r in evals)  # no full distribution
    assert all(r["heldout_teacher_nll"] > 0 for r in evals)


def test_unreachable_teacher_checkpoints_and_resume_matches_uninterrupted(
    tmp_path, tok, prompt_file
):
    args = ("recipe=sampled_rkl", "train.steps=4", "train.checkpoint_every=1")
    full = distill(tiny_cfg(tmp_path, prompt_file, *args, name="full"), models=_remote_models(tok))
    # the third step's teacher call fails (eval at step 0 makes calls too: count them)
    probe = _remote_models(tok)
    distill(
        tiny_cfg(tmp_path, prompt_file, *args, "train.steps=2", name="probe"), models=probe
    )
    calls_for_two_steps = probe.teacher.calls - 1  # minus the final eval's one call
    models = _remote_models(tok, fail_on_call=calls_for_two_steps + 1)
    cfg = tiny_cfg(tmp_path, prompt_file, *args, name="cut")
    with pytest.raises(TeacherUnreachable) as err:
        distill(cfg, models=models)
    msg = str(err.value)
    assert "http://127.0.0.1:9/" in msg and "boom" in msg and "--resume" in msg
    assert "checkpoint of step 2" in msg
    done = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if "step" in p.name)
    assert done[-1].endswith("2"), done
    resumed = distill(
        tiny_cfg(tmp_path, prompt_file, *args, name="cut"),
        models=_remote_models(tok),
        resume=True,
    )
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-7)


def test_student_prune_to_prunes_a_given_student_and_refuses_too_many(tmp_path, prompt_file):
    from opd.build import build_models
    from opd.models import num_decoder_layers
    from tests.helpers import save_tiny_models

    t, s = save_tiny_models(tmp_path / "m")  # student: 2 layers
    cfg = tiny_cfg(tmp_path, prompt_file, f"model.teacher={t}", f"model.student={s}")
    assert num_decoder_layers(build_models(cfg).student) == 2
    cfg.model.student_prune_to = 1
    assert num_decoder_layers(build_models(cfg).student) == 1
    cfg.model.student_prune_to = 3
    with pytest.raises(ConfigError, match=r"student_prune_to=3.*only 2 decoder layers"):
        build_models(cfg)


def test_served_teacher_needs_a_student_and_no_ensemble(tmp_path, prompt_file):
    from opd.build import build_models

    cfg = tiny_cfg(tmp_path, prompt_file, "model.teacher=http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="model.student: required with a served teacher"):
        build_models(cfg)


def test_resume_may_move_a_served_teacher_but_not_a_local_one():
    from opd.config_check import check_resume_overrides

    def cfg(teacher):
        sections = {k: {} for k in ("method", "data", "train")}
        sections["method"] = {"recipe": "sampled_rkl", "args": {}}
        sections["data"] = {"train": "x", "eval": "", "eval_count": 1}
        sections["train"] = {"batch_size": 1, "grad_accum": 1, "seed": 0}
        sections["model"] = {
            "teacher": teacher,
            "teacher_weights": "",
            "student": "s",
            "student_layers": 1,
            "student_prune_to": 0,
            "dtype": "float32",
        }
        return sections

    check_resume_overrides("run", cfg("http://127.0.0.1:8000"), cfg("http://127.0.0.1:8001"))
    with pytest.raises(ConfigError, match="model.teacher"):
        check_resume_overrides("run", cfg("a"), cfg("http://127.0.0.1:8001"))


def test_readme_teacher_table_matches_the_recipes():
    from pathlib import Path

    from opd.teachers.table import render, rows

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    inside = readme.split("<!-- teacher-table -->\n")[1].split("<!-- /teacher-table -->")[0]
    assert inside == render(), "regenerate: python -m opd.teachers.table"
    table = {name: ok for name, _, ok in rows()}
    assert table["sampled_rkl"] == [True, False, True]  # local, ensemble, served
    assert table["on_policy_rkl"] == [True, True, False]
    assert table["multi_teacher"] == [False, True, False]
    assert table["seqkd"][2] is False and table["topk_rkl"][2] is True
