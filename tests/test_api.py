"""The library entry points: `opd.Distiller(...).train()` and `distill(cfg, models=Models(...))`."""

from __future__ import annotations

import pytest

import opd
from opd.build import Models
from opd.errors import ConfigError, DataError, ModelError
from opd.logs import read_metrics
from opd.tiny import tiny_llama
from opd.train import distill
from tests.helpers import fresh_models, tiny_cfg

QUIET = dict(log=lambda *_: None)


def _pair(tok):
    return (
        tiny_llama(len(tok), hidden=64, layers=3, seed=11),
        tiny_llama(len(tok), hidden=48, layers=2, seed=12),
    )


def _prompts(n=24):
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b), "answer": str(a + b)})
    return rows


def test_distiller_lowers_heldout_kl(tmp_path, tok):
    from opd.recipes import get_recipe

    teacher, student = _pair(tok)
    res = opd.Distiller(
        get_recipe("on_policy_rkl").build(),
        teacher=teacher,
        student=student,
        tokenizer=tok,
        train=_prompts(),
        eval=[r["prompt"] for r in _prompts(8)],
        output_dir=tmp_path / "run",
        steps=25,
        lr=3e-3,
        batch_size=4,
        max_new_tokens=6,
        progress=False,
        **QUIET,
    ).train()
    evals = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [0, 25]
    assert evals[1]["heldout_kl"] < 0.5 * evals[0]["heldout_kl"], evals
    assert (res.run_dir / "student").is_dir() and len(res.losses) == 25


def test_distiller_holds_out_eval_rows_from_train_by_default(tmp_path, tok):
    teacher, student = _pair(tok)
    d = opd.Distiller(
        "supervised_kd",
        teacher=teacher,
        student=student,
        tokenizer=tok,
        train=_prompts(20),
        output_dir=tmp_path / "r",
        eval_count=5,
        **QUIET,
    )
    # the same rule as the command line: at most a fifth of the rows are held out
    assert len(d.data.eval) == 4 and len(d.data.train) == 16
    assert d.data.describe() == [
        "train: given in code (16 of 20 rows)",
        "eval: held out from train=... (4 rows, chosen by train.seed=0; "
        "data.eval_count=5 capped at a fifth of 20 rows)",
    ]
    assert d.cfg.method.recipe == "supervised_kd"


def test_distill_computes_vocab_size_of_plain_models(tmp_path, prompt_file, tok):
    """Models(teacher, student, tokenizer) with vocab_size 0 used to train nothing (loss 0)."""
    teacher, student = _pair(tok)
    models = Models(teacher, student, tok)
    res = distill(
        tiny_cfg(tmp_path, prompt_file, "train.steps=2"), models=models, evaluate=False, **QUIET
    )
    assert models.vocab_size == len(tok)
    rows = [r for r in res.metrics if "loss" in r]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 and r["tokens"] > 0 for r in rows)


def test_distill_refuses_a_vocab_size_larger_than_the_heads(tmp_path, prompt_file, tok):
    teacher, student = _pair(tok)
    with pytest.raises(ModelError, match=r"vocab_size=999 .*valid: 1\.\.\d+"):
        distill(
            tiny_cfg(tmp_path, prompt_file, "train.steps=1"),
            models=Models(teacher, student, tok, vocab_size=999),
            **QUIET,
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        (dict(method=42), ConfigError, "method: expected an opd.method.Method"),
        (dict(method="no_such_recipe"), ConfigError, "no_such_recipe"),
        (dict(train=[]), DataError, "train: no prompts"),
        (dict(train="1+1="), DataError, "train: expected a list"),
        (dict(train=["1+1=", 7]), DataError, "train[1]"),
        (dict(eval=[{"text": "x"}]), DataError, "eval[0]"),
        (dict(stepz=3), ConfigError, "stepz"),
        (dict(lr=-1), ConfigError, "lr"),
    ],
)
def test_distiller_bad_arguments(tmp_path, tok, kwargs, error, needle):
    teacher, student = _pair(tok)
    args = dict(method="gkd", train=["1+1=", "2+2="], output_dir=tmp_path / "run")
    args.update(kwargs)
    method = args.pop("method")
    with pytest.raises(error) as err:
        opd.Distiller(method, teacher=teacher, student=student, tokenizer=tok, **args, **QUIET)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_epochs_set_the_number_of_steps(tmp_path, prompt_file, tok):
    """train.epochs replaces train.steps once the training set's size is known."""
    from opd.config import load_config

    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'ep'}",
            f"data.train={prompt_file}",
            "data.eval_count=4",  # 24 rows: 4 held out, 20 train
            "data.chat_template=false",
            "sampling.max_new_tokens=4",
            "train.batch_size=4",
            "train.grad_accum=2",
            "train.epochs=1.5",
            "train.progress=false",
            "method.recipe=supervised_kd",
        ],
    )
    logged = []
    res = distill(cfg, models=fresh_models(tok), evaluate=False, log=logged.append)
    assert len(res.losses) == 4  # ceil(1.5 * 20 / (4 * 2)) = ceil(3.75)
    steps = [r["step"] for r in read_metrics(res.run_dir / "metrics.jsonl") if "event" not in r]
    assert steps == [1, 2, 3, 4]
    assert any("train.epochs=1.5: 4 steps over 20 training prompts" in ln for ln in logged)
    # the saved config leaves the derived steps out, so it can be given back with --config
    # (a file with both train.steps and train.epochs is refused) and resumed
    again = load_config(res.run_dir / "config.yaml", [f"output_dir={tmp_path / 'again'}"])
    assert again.train.epochs == 1.5 and again.train.steps == load_config().train.steps
    resumed = distill(
        load_config(res.run_dir / "config.yaml"),
        models=fresh_models(tok),
        resume=True,
        evaluate=False,
        log=lambda *_: None,
    )
    assert resumed.already_finished and len(resumed.losses) == 4
