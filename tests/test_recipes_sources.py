"""The recipes built on the token-level, prefix and replay sources: build, validate, train, resume."""

from __future__ import annotations

import math

import pytest
import torch

from opd.context import StepContext
from opd.errors import ConfigError
from opd.method import Method
from opd.recipes import RECIPES, get_recipe
from opd.sampling import AdaSwitch, Mix, Prefix, Replay, Speculative
from opd.sampling.sources import make_rollout
from opd.signals import ByWriter, Divergence, Paired
from opd.train import distill
from opd.types import StudentRows, TeacherScores
from tests.helpers import assert_describes, fresh_models, tiny_cfg

NEW = {
    "skd": Speculative,
    "adaswitch": AdaSwitch,
    "fast_opd": Prefix,
    "distillm": Replay,
    "distillm2": Paired,
}
QUIET = dict(evaluate=False, log=lambda *_: None)


@pytest.mark.parametrize("name", sorted(NEW))
def test_recipe_builds_with_its_source(name):
    info = RECIPES[name]
    method = info.build()
    assert isinstance(method, Method) and isinstance(method.prefixes, NEW[name])
    assert info.citation and info.summary and info.granularity in ("token", "sequence", "hybrid")
    assert_describes(method)
    assert method.name == name


def test_recipe_compositions_and_argument_checks():
    assert get_recipe("skd").build(k=5).prefixes.k == 5
    assert get_recipe("fast_opd").build(length=3).signal.name == "reverse_kl"
    d1 = get_recipe("distillm").build()
    assert d1.signal.name == "skew_forward_kl" and d1.signal.params == {"alpha": 0.1}
    assert d1.prefixes.needs_completions
    d2 = get_recipe("distillm2").build()
    assert isinstance(d2.signal, ByWriter) and d2.reduction == "sequence_mean"
    assert [p.describe().split(":")[0] for p in d2.prefixes.sources] == ["teacher", "student"]
    assert {w: (s.name, s.params) for w, s in d2.signal.parts} == {
        "teacher": ("skew_forward_kl", {"alpha": 0.1}),
        "student": ("skew_reverse_kl", {"alpha": 0.1, "stop_grad_mix": True}),
    }
    d2_batch = get_recipe("distillm2").build(paired=False)
    assert isinstance(d2_batch.prefixes, Mix) and d2_batch.prefixes.other == "teacher"
    with pytest.raises(ConfigError, match="distillm"):
        get_recipe("distillm").build(divergence="forward_kl")
    with pytest.raises(ConfigError, match="tau"):
        get_recipe("adaswitch").build(tau=math.nan)


# Small enough that the buffer fills in one batch and the replay path runs within 2 steps.
ARGS = {
    "skd": ["method.args.k=20"],
    "adaswitch": ["method.args.tau=4.6"],  # about −log(1/105): some rows switch
    "fast_opd": ["method.args.length=3"],
    "distillm": ["method.args.capacity=4", "method.args.rho_start=1.0", "method.args.rho_end=1.0"],
    "distillm2": [],
}


@pytest.mark.parametrize("name", sorted(NEW))
def test_recipe_trains_two_steps(tmp_path, prompt_file, tok, name):
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=2", f"method.recipe={name}", *ARGS[name])
    res = distill(cfg, models=fresh_models(tok), **QUIET)
    assert len(res.losses) == 2 and all(math.isfinite(v) and v >= 0 for v in res.losses)
    rows = res.metrics
    assert [r["step"] for r in rows] == [1, 2] and all(r["tokens"] > 0 for r in rows)
    if name == "fast_opd":
        assert all(r["completion_length"] <= 3 and r["prefix_length"] == 3 for r in rows)
    if name in ("skd", "adaswitch", "distillm", "distillm2"):
        assert all(0.0 <= r["student_share"] <= 1.0 for r in rows)


def test_distillm_resume_restores_the_replay_buffer(tmp_path, prompt_file, tok):
    common = (
        "train.steps=4",
        "method.recipe=distillm",
        "sampling.temperature=1.0",
        *ARGS["distillm"],
    )
    straight = distill(
        tiny_cfg(tmp_path, prompt_file, *common, name="a"), models=fresh_models(tok), **QUIET
    )
    assert any(r["replayed"] for r in straight.metrics)  # the buffer is used before the end
    distill(
        tiny_cfg(tmp_path, prompt_file, *common, name="b"),
        models=fresh_models(tok),
        stop_after=2,
        **QUIET,
    )
    torch.manual_seed(1234)  # whatever happens in between must not matter
    resumed = distill(
        tiny_cfg(tmp_path, prompt_file, *common, name="b"),
        models=fresh_models(tok),
        resume=True,
        **QUIET,
    )
    assert len(resumed.losses) == 4
    for a, b in zip(straight.losses, resumed.losses):
        assert abs(a - b) <= 1e-6, (straight.losses, resumed.losses)
    assert [r["replayed"] for r in resumed.metrics] == [r["replayed"] for r in straight.metrics[2:]]


class _Fixed:
    """A prefix source writing fixed completions (per prompt index) as `writer`."""

    def __init__(self, writer, completions):
        self.writer, self.completions = writer, completions

    def rollout(self, examples, ctx):
        prompts = [ex.prompt_ids for ex in examples]
        comps = [self.completions[i] for i in range(len(examples))]
        return make_rollout(prompts, comps, ctx.pad_id, self.writer, [ex.answer for ex in examples])

    def describe(self):
        return self.writer


def test_paired_rollout_holds_both_responses_of_each_prompt():
    from types import SimpleNamespace as NS

    examples = [NS(prompt_ids=(5, 6), answer="a"), NS(prompt_ids=(7,), answer="b")]
    src = Paired((_Fixed("teacher", [[1, 2, 3], [4]]), _Fixed("student", [[9], [8, 8]])))
    ro = src.rollout(examples, NS(pad_id=0))
    assert ro.row_writers == ("teacher", "teacher", "student", "student")
    mask = ro.completion_mask_BT.bool()
    comps = [ro.completion_ids_BT[b][mask[b]].tolist() for b in range(4)]
    assert comps == [[1, 2, 3], [4], [9], [8, 8]]
    prompts = [
        ro.input_ids_BL[b, : ro.prompt_len][
            ro.attention_mask_BL[b, : ro.prompt_len].bool()
        ].tolist()
        for b in range(4)
    ]
    assert prompts == [[5, 6], [7], [5, 6], [7]]  # the same prompt for both writers
    assert ro.answers == ("a", "b", "a", "b") and ro.info["student_share"] == 0.5


def test_by_writer_scores_each_row_with_its_writers_signal():
    # Rows 0-1 teacher-written, rows 2-3 student-written, as `Paired` lays them out.
    g = torch.Generator().manual_seed(0)
    lengths = [3, 1, 2, 4]
    ro = make_rollout([[1]] * 4, [[2] * n for n in lengths], 0, "paired")
    ro = __import__("dataclasses").replace(ro, row_writers=("teacher",) * 2 + ("student",) * 2)
    n, d, v = sum(lengths), 4, 7
    rows = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    student = StudentRows(
        torch.randn(n, d, generator=g, dtype=torch.float64),
        torch.randn(v, d, generator=g, dtype=torch.float64),
        torch.full((n,), 2),
        rows,
    )
    teacher = TeacherScores(
        torch.randn(n, d, generator=g, dtype=torch.float64),
        torch.randn(v, d, generator=g, dtype=torch.float64),
    )
    skl = Divergence("skew_forward_kl", {"alpha": 0.1})
    srkl = Divergence("skew_reverse_kl", {"alpha": 0.1, "stop_grad_mix": True})
    ctx = StepContext(rollout=ro, chunk_size=3)
    got = ByWriter((("teacher", skl), ("student", srkl)))(student, teacher, ctx)
    on_teacher = rows < 2
    want = torch.where(on_teacher, skl(student, teacher, ctx), srkl(student, teacher, ctx))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert not torch.allclose(skl(student, teacher, ctx), srkl(student, teacher, ctx))
