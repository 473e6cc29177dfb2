"""The training loop on tiny models: it learns, it resumes exactly, both loss paths agree."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opd.context import StepContext
from opd.errors import ConfigError
from opd.logs import read_metrics
from opd.train import distill, lr_lambda
from tests.helpers import fresh_models, tiny_cfg


def test_on_policy_rkl_lowers_heldout_kl(tmp_path, prompt_file, tok):
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=25", "method.recipe=on_policy_rkl")
    res = distill(cfg, models=fresh_models(tok), log=lambda *_: None)
    evals = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if r.get("event") == "eval"]
    before, after = evals[0]["heldout_kl"], evals[-1]["heldout_kl"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 25
    assert after < 0.5 * before, (before, after)
    # the training-time rollout KL goes down too
    steps = [r for r in res.metrics if "loss" in r]
    assert sum(r["teacher_kl"] for r in steps[-5:]) < sum(r["teacher_kl"] for r in steps[:5])


def test_run_folder_contents(tmp_path, prompt_file, tok):
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=2", "method.recipe=gkd")
    res = distill(cfg, models=fresh_models(tok), log=lambda *_: None)
    run = res.run_dir
    assert (run / "config.yaml").is_file()
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "teacher_kl", "completion_length", "tokens_per_s", "grad_norm", "lr"):
        assert key in rows[0] and rows[0][key] is not None
    ckpt = run / "checkpoints" / "step_000002"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert set(p.name for p in ckpt.iterdir()) == {
        "student.safetensors",
        "optimizer.pt",
        "rng.safetensors",
        "state.json",
    }
    assert not list((run / "checkpoints").glob(".tmp-*"))
    weights = load_file(str(ckpt / "student.safetensors"))
    for k, v in res.models.student.state_dict().items():
        torch.testing.assert_close(weights[k], v)
    loaded = AutoModelForCausalLM.from_pretrained(run / "student")
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded(ids).logits, res.models.student(ids).logits)


@pytest.mark.parametrize("recipe", ["gkd", "on_policy_rkl", "exopd"])
def test_resume_reproduces_uninterrupted_run(tmp_path, prompt_file, tok, recipe):
    common = ("train.steps=6", f"method.recipe={recipe}", "sampling.temperature=1.0")
    straight = distill(
        tiny_cfg(tmp_path, prompt_file, *common, name="a"),
        models=fresh_models(tok),
        evaluate=False,
        log=lambda *_: None,
    )
    cfg_b = tiny_cfg(tmp_path, prompt_file, *common, name="b")
    first = distill(
        cfg_b, models=fresh_models(tok), stop_after=3, evaluate=False, log=lambda *_: None
    )
    assert len(first.losses) == 3
    torch.manual_seed(1234)  # whatever happens in between must not matter
    cfg_b2 = tiny_cfg(tmp_path, prompt_file, *common, name="b")
    resumed = distill(
        cfg_b2, models=fresh_models(tok), resume=True, evaluate=False, log=lambda *_: None
    )
    assert len(straight.losses) == len(resumed.losses) == 6
    for a, b in zip(straight.losses, resumed.losses):
        assert abs(a - b) <= 1e-6, (straight.losses, resumed.losses)
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_chunked_and_materialized_paths_agree(tmp_path, prompt_file, tok):
    runs = []
    for path in ("chunked", "materialized"):
        cfg = tiny_cfg(
            tmp_path,
            prompt_file,
            "train.steps=3",
            "method.recipe=gkd",
            f"train.loss_path={path}",
            "train.chunk_size=5",
            name=path,
        )
        runs.append(distill(cfg, models=fresh_models(tok), evaluate=False, log=lambda *_: None))
    for a, b in zip(runs[0].losses, runs[1].losses):
        assert abs(a - b) < 1e-5


@pytest.mark.parametrize("recipe", ["gkd", "supervised_kd", "on_policy_rkl"])
def test_micro_step_gradients_match_reference_float64(tok, recipe):
    from opd.data import Example
    from opd.recipes import get_recipe
    from opd.sampling import GenerationParams, HFBackend
    from opd.train import micro_step

    models = fresh_models(tok)
    models.student.double()
    models.teacher.double()
    method = get_recipe(recipe).build()
    exs = [Example((5 + i, 6, 7 + i), (8, 9, 2), "1", f"m:{i}", "") for i in range(3)]
    ctx = StepContext(
        models.student,
        models.teacher,
        HFBackend(),
        GenerationParams(5, 1.0),
        models.pad_id,
        models.stop_ids,
    )
    torch.manual_seed(0)
    rollout = method.prefixes.rollout(exs, ctx)
    grads, losses = [], []
    for materialize in (False, True):
        models.student.zero_grad()
        loss, _, _ = micro_step(
            method, models, rollout, StepContext(chunk_size=4, materialize=materialize), "cpu"
        )
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in models.student.parameters()])
    assert losses[0] == pytest.approx(losses[1], abs=1e-10)
    for g_chunked, g_ref in zip(*grads):
        torch.testing.assert_close(g_chunked, g_ref, atol=1e-9, rtol=1e-7)


def test_dataset_recipe_needs_completions(tmp_path, tok):
    from tests.helpers import write_prompts

    f = write_prompts(tmp_path / "p.jsonl", completions=False)
    cfg = tiny_cfg(tmp_path, f, "train.steps=1", "method.recipe=supervised_kd")
    with pytest.raises(ConfigError, match="completion"):
        distill(cfg, models=fresh_models(tok), log=lambda *_: None)


def test_existing_run_folder_is_not_overwritten(tmp_path, prompt_file, tok):
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=1")
    distill(cfg, models=fresh_models(tok), evaluate=False, log=lambda *_: None)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        distill(
            tiny_cfg(tmp_path, prompt_file, "train.steps=1"),
            models=fresh_models(tok),
            log=lambda *_: None,
        )
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_lr_schedule_shape():
    f = lr_lambda(warmup=2, total=10, min_ratio=0.1)
    vals = [f(s) for s in range(11)]
    assert vals[0] < vals[1] < vals[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(vals[2:], vals[3:]))
    assert vals[10] == pytest.approx(0.1)


def _double_models(tok):
    models = fresh_models(tok)
    models.student.double()
    models.teacher.double()
    return models


@pytest.mark.parametrize("recipe", ["supervised_kd", "seqkd_dataset"])
def test_grad_accum_equals_one_batch_of_twice_the_size(tmp_path, tok, recipe):
    """grad_accum=2 with batch 4 == grad_accum=1 with batch 8 on the same examples: the loss
    is the global token mean (or, for sequence-mean methods, the mean over all sequences) of
    the step, in value and gradient (float64). Prompts share one length ('a+b='), so padding
    is the same; completions come from the data and differ in length (1 or 2 digits)."""
    import dataclasses

    from opd.recipes import get_recipe
    from tests.helpers import write_prompts

    f = write_prompts(tmp_path / "p.jsonl", n=16, seed=3)
    method = get_recipe("supervised_kd").build()
    if recipe == "seqkd_dataset":
        method = dataclasses.replace(method, reduction="sequence_mean", name="seq")
    out = {}
    for accum, batch in ((2, 4), (1, 8)):
        cfg = tiny_cfg(
            tmp_path,
            f,
            "train.steps=1",
            f"train.grad_accum={accum}",
            f"train.batch_size={batch}",
            "train.max_grad_norm=0",
            "train.lr=1e-6",
            name=f"a{accum}",
        )
        res = distill(
            cfg, models=_double_models(tok), method=method, evaluate=False, log=lambda *_: None
        )
        grads = [p.grad.clone() for p in res.models.student.parameters()]
        out[accum] = (res.metrics[0], grads)
    (row2, g2), (row1, g1) = out[2], out[1]
    assert row2["tokens"] == row1["tokens"] > 0
    assert row2["loss"] == pytest.approx(row1["loss"], rel=1e-12, abs=1e-12)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("count", [None, 11.0])
def test_closed_form_coefficients_equal_the_autograd_probe(reduction, count):
    from opd.losses.reduce import coefficients, reduce

    g = torch.Generator().manual_seed(0)
    mask_BT = torch.rand(4, 6, generator=g) > 0.4
    mask_BT[2] = False  # a sequence with no counted token
    probe_BT = torch.zeros(4, 6, dtype=torch.float64, requires_grad=True)
    (auto_BT,) = torch.autograd.grad(reduce(reduction, probe_BT, mask_BT.double(), count), probe_BT)
    closed_BT = coefficients(reduction, mask_BT, count, dtype=torch.float64)
    torch.testing.assert_close(closed_BT, auto_BT, rtol=0, atol=1e-15)
    values_BT = torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert float((closed_BT * values_BT).sum()) == pytest.approx(
        float(reduce(reduction, values_BT, mask_BT.double(), count)), rel=1e-14
    )


def test_rollout_kl_reuses_the_signal_only_when_it_is_reverse_kl(tmp_path, prompt_file, tok):
    """GKD with β = 1 is KL(q_student ‖ p_teacher): its logged KL must reuse the loss values
    (no second vocabulary pass) and equal the separately computed KL; β = 0.5 must not."""
    from opd import step as train_mod
    from opd.signals import Divergence

    assert Divergence("generalized_jsd", {"beta": 1.0}).is_reverse_kl(0.3)
    assert Divergence("reverse_kl").is_reverse_kl(0.0)
    assert not Divergence("generalized_jsd", {"beta": 0.5}).is_reverse_kl(0.0)
    assert not Divergence("reverse_kl", temperature=2.0).is_reverse_kl(0.0)
    assert not Divergence("forward_kl").is_reverse_kl(0.0)

    calls = []
    real = train_mod.REVERSE_KL

    class Counting:
        def __call__(self, *a, **k):
            calls.append(1)
            return real(*a, **k)

    logged = {}
    for beta in (1.0, 0.5):
        calls.clear()
        train_mod.REVERSE_KL = Counting()
        try:
            cfg = tiny_cfg(
                tmp_path,
                prompt_file,
                "train.steps=2",
                "method.recipe=gkd",
                "method.args.lmbda=1.0",
                f"method.args.beta={beta}",
                name=f"b{beta}",
            )
            res = distill(cfg, models=fresh_models(tok), evaluate=False, log=lambda *_: None)
        finally:
            train_mod.REVERSE_KL = real
        logged[beta] = [r["teacher_kl"] for r in res.metrics if "loss" in r]
        assert len(calls) == (0 if beta == 1.0 else 2), beta
    # same seed, same models: the same first rollout, so the reused and the recomputed KL
    # agree (later steps differ: the two losses update the student differently)
    assert logged[1.0][0] == pytest.approx(logged[0.5][0], rel=1e-5)


@pytest.mark.parametrize("recipe", ["on_policy_rkl", "supervised_kd", "gkd"])
def test_one_pass_loss_is_taken_and_equals_the_two_pass_loss(
    tmp_path, prompt_file, tok, recipe, monkeypatch
):
    """Divergence recipes without token weights take the one-pass loss; the run (losses and
    the final student) is the same as with the two-pass path."""
    from opd import step as train_mod

    real = train_mod.one_pass_loss
    taken = []

    def spy(*a, **k):
        out = real(*a, **k)
        taken.append(out is not None)
        return out

    runs = {}
    for mode in ("one_pass", "two_pass"):
        monkeypatch.setattr(
            train_mod, "one_pass_loss", spy if mode == "one_pass" else (lambda *a, **k: None)
        )
        cfg = tiny_cfg(
            tmp_path,
            prompt_file,
            "train.steps=3",
            f"method.recipe={recipe}",
            name=f"{recipe}-{mode}",
        )
        res = distill(cfg, models=fresh_models(tok), evaluate=False, log=lambda *_: None)
        runs[mode] = (
            [r["loss"] for r in res.metrics if "loss" in r],
            [r["teacher_kl"] for r in res.metrics if "loss" in r],
            {k: v.clone() for k, v in res.models.student.state_dict().items()},
        )
    assert taken and all(taken)
    assert runs["one_pass"][0] == pytest.approx(runs["two_pass"][0], rel=1e-5, abs=1e-8)
    assert runs["one_pass"][1] == pytest.approx(runs["two_pass"][1], rel=1e-5, abs=1e-8)
    for k, v in runs["two_pass"][2].items():
        torch.testing.assert_close(runs["one_pass"][2][k], v, atol=1e-5, rtol=1e-4)


def test_methods_with_token_weights_keep_the_two_pass_loss():
    """A weight may depend on the values, so such methods never take the one-pass path."""
    import dataclasses

    from opd import step as train_mod
    from opd.recipes import get_recipe
    from opd.weights import SpecialTokenMask

    plain = get_recipe("gkd").build()
    weighted = dataclasses.replace(plain, weights=(SpecialTokenMask(),))
    assert train_mod.one_pass_loss(weighted, None, None, None, None, None) is None
    assert get_recipe("revisiting_opd").build().weights  # a shipped recipe with weights
