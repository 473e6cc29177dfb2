"""Sample completions (`train.sample_every`): rows in samples.jsonl equal the student's and
the teacher's greedy completions, go to the trackers, never change the RNG, and a resumed
run does not duplicate a step's rows."""

from __future__ import annotations

import json

import pytest
import torch

from opd.build import Models, build_data
from opd.evaluate import generic_verify, greedy_completions
from opd.samples import (
    SAMPLES_FILE,
    read_samples,
    sample_due,
    truncate_samples,
    write_samples,
)
from opd.tracking import open_trackers
from tests.helpers import fresh_models, tiny_cfg


@pytest.fixture
def setup(tmp_path, tok, prompt_file):
    cfg = tiny_cfg(tmp_path, prompt_file)
    models = fresh_models(tok)
    return tmp_path / "run", models, build_data(cfg, tok).eval


class Recorder:
    def __init__(self):
        self.calls = []

    def log_samples(self, step, samples):
        self.calls.append((step, samples))


def greedy_text(model, models, examples, n=6):
    comps = greedy_completions(model, examples, models.pad_id, models.stop_ids, n)
    return [models.tokenizer.decode(c, skip_special_tokens=True) for c in comps]


def test_rows_hold_the_greedy_completions_of_student_and_teacher(setup):
    run_dir, models, examples = setup
    rec = Recorder()
    rows = write_samples(run_dir, 4, models, examples, max_new_tokens=6, count=3, trackers=rec)
    assert len(rows) == 3
    assert [r["prompt"] for r in rows] == [ex.prompt_text for ex in examples[:3]]
    assert [r["student"] for r in rows] == greedy_text(models.student, models, examples[:3])
    assert [r["teacher"] for r in rows] == greedy_text(models.teacher, models, examples[:3])
    assert rows[0]["student"] != rows[0]["teacher"]  # two different random models
    for r, ex in zip(rows, examples):
        assert r["step"] == 4 and r["answer"] == ex.answer
        assert r["student_correct"] == generic_verify(r["student"], ex.answer)
        assert r["teacher_correct"] == generic_verify(r["teacher"], ex.answer)
    assert read_samples(run_dir) == rows
    assert rec.calls == [(4, rows)]


def test_count_caps_the_prompts_and_no_examples_writes_nothing(setup):
    run_dir, models, examples = setup
    assert len(write_samples(run_dir, 1, models, examples, max_new_tokens=4, count=1)) == 1
    assert len(write_samples(run_dir, 2, models, examples[:2], max_new_tokens=4, count=5)) == 2
    rec = Recorder()
    assert write_samples(run_dir, 3, models, [], max_new_tokens=4, count=3, trackers=rec) == []
    assert [r["step"] for r in read_samples(run_dir)] == [1, 2, 2]
    assert rec.calls == []


def test_sampling_leaves_the_random_state_alone(setup):
    run_dir, models, examples = setup
    torch.manual_seed(123)
    before = torch.get_rng_state()
    write_samples(run_dir, 1, models, examples, max_new_tokens=6, count=3)
    assert torch.equal(torch.get_rng_state(), before)


def test_without_a_local_teacher_the_teacher_column_is_null(setup):
    run_dir, models, examples = setup
    no_teacher = Models(None, models.student, models.tokenizer, models.vocab_size)
    rows = write_samples(run_dir, 1, no_teacher, examples, max_new_tokens=6, count=2)
    assert [r["teacher"] for r in rows] == [None, None]
    assert all("teacher_correct" not in r for r in rows)
    assert [r["student"] for r in rows] == greedy_text(models.student, models, examples[:2])


def test_rows_without_an_answer_have_no_correct_flags(setup):
    run_dir, models, examples = setup
    from dataclasses import replace

    rows = write_samples(
        run_dir, 1, models, [replace(examples[0], answer=None)], max_new_tokens=4, count=3
    )
    assert set(rows[0]) == {"step", "prompt", "student", "teacher"}


def test_resume_never_duplicates_a_step(setup):
    run_dir, models, examples = setup
    for step in (2, 4, 6):
        write_samples(run_dir, step, models, examples, max_new_tokens=4, count=2)
    # a crash after step 6, resumed from the checkpoint at step 4
    with open(run_dir / SAMPLES_FILE, "a") as fh:
        fh.write('{"step": 7, "prompt": "cut by the cra')
    assert truncate_samples(run_dir, 4) == 3  # step 6's two rows and the torn line
    assert [r["step"] for r in read_samples(run_dir)] == [2, 2, 4, 4]
    write_samples(run_dir, 6, models, examples, max_new_tokens=4, count=2)
    # writing a step again (resumed past a sample point without truncating) replaces it
    write_samples(run_dir, 6, models, examples, max_new_tokens=4, count=2)
    write_samples(run_dir, 4, models, examples, max_new_tokens=4, count=2)
    assert [r["step"] for r in read_samples(run_dir)] == [2, 2, 4, 4]
    assert truncate_samples(run_dir, 10) == 0
    assert truncate_samples(run_dir / "missing", 0) == 0


def test_sample_due():
    assert [s for s in range(0, 11) if sample_due(s, 5)] == [5, 10]
    assert not any(sample_due(s, 0) for s in range(0, 11))


def test_samples_reach_tensorboard(setup):
    from tensorboard.backend.event_processing import event_accumulator

    run_dir, models, examples = setup
    trk = open_trackers("tensorboard", run_dir, {}, False)
    rows = write_samples(run_dir, 3, models, examples, max_new_tokens=4, count=2, trackers=trk)
    trk.close()
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    (event,) = acc.Tensors("samples/text_summary")
    table = event.tensor_proto.string_val[0].decode()
    assert event.step == 3
    assert all(json.dumps(r["prompt"])[1:-1] in table for r in rows)


# ------------------------------------------------------------ end to end, through the loop


def test_distill_end_to_end_with_trackers_and_samples(tmp_path, tok, prompt_file):
    from tensorboard.backend.event_processing import event_accumulator

    import opd.train as train
    from opd.logs import read_metrics

    extra = ("train.steps=4", "train.eval_every=2", "train.seed=3")
    plain = train.distill(
        tiny_cfg(tmp_path, prompt_file, *extra, name="plain"),
        models=fresh_models(tok),
        log=lambda *a: None,
    )

    cfg = tiny_cfg(
        tmp_path,
        prompt_file,
        *extra,
        "train.log_to=tensorboard",
        "train.sample_every=2",
        "train.sample_count=2",
        name="tracked",
    )
    train.distill(cfg, models=fresh_models(tok), stop_after=3, log=lambda *a: None)
    res = train.distill(cfg, models=fresh_models(tok), resume=True, log=lambda *a: None)

    assert res.losses == plain.losses  # samples and trackers do not change training
    run_dir = res.run_dir
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in metrics if "event" not in r] == [1, 2, 3, 4]
    samples = read_samples(run_dir)
    assert [r["step"] for r in samples] == [2, 2, 4, 4]
    assert samples[0]["prompt"] == samples[2]["prompt"]  # the same prompts at every point

    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    for key, event in (("loss", None), ("grad_norm", None), ("heldout_kl", "eval")):
        want = {r["step"]: r[key] for r in metrics if r.get("event") == event}
        got = acc.Scalars(key if event is None else f"{event}/{key}")
        assert len(got) == len(want)
        assert {e.step: e.value for e in got} == pytest.approx(want, rel=1e-6)
    assert [e.step for e in acc.Tensors("samples/text_summary")] == [2, 4]
