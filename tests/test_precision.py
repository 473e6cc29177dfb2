"""train.precision=bf16 (autocast over float32 master weights) against its float32 twin, its
refusals, and train.gradient_checkpointing (same loss and gradients, less saved activation
memory). See opd/precision.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import opd.precision
import opd.step
from opd.context import StepContext
from opd.data import Example
from opd.errors import ConfigError
from opd.models import decoder_and_head
from opd.precision import enable_gradient_checkpointing
from opd.recipes import get_recipe
from opd.sampling import GenerationParams, HFBackend
from opd.train import distill, micro_step
from tests.helpers import (
    assert_clean_error,
    fresh_models,
    run_opd,
    save_tiny_models,
    small_cli_args,
    tiny_cfg,
    write_prompts,
)

QUIET = {"log": lambda *_: None}

# One micro-step in bf16 vs float32 on the tiny models: measured loss rel. error ≤ 0.11 %,
# gradient rel. error (‖g_bf16 − g_fp32‖ / ‖g_fp32‖) 0.6 % (full vocabulary), 3.7 % (top-k);
# the bounds leave room.
LOSS_RTOL = 1e-2
GRAD_RTOL = 6e-2


def _rollout(models, recipe):
    method = get_recipe(recipe).build()
    exs = [Example((5 + i, 6, 7 + i), (8, 9, 2), "1", f"m:{i}", "") for i in range(4)]
    ctx = StepContext(
        models.student,
        models.teacher,
        HFBackend(),
        GenerationParams(6, 1.0),
        models.pad_id,
        models.stop_ids,
    )
    torch.manual_seed(0)
    return method, method.prefixes.rollout(exs, ctx)


def _loss_and_grad(method, models, rollout, precision):
    models.student.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # sampled signals draw with the same state
    ctx = StepContext(chunk_size=4, models=models)
    loss, _, _ = micro_step(method, models, rollout, ctx, torch.device("cpu"), None, precision)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in models.student.parameters() if p.grad is not None])
    return float(loss.detach()), grad


@pytest.mark.parametrize("recipe", ["on_policy_rkl", "topk_rkl", "sampled_rkl"])
@pytest.mark.parametrize("mode, rows_dtype", [
    ("bf16", torch.float32),  # the default: float32 logits (the heads outside autocast)
    ("bf16-logits", torch.bfloat16),  # train.bf16_logits=true: the heads in bf16 too
])
def test_bf16_micro_step_is_close_to_the_float32_twin(tok, recipe, mode, rows_dtype, monkeypatch):
    models = fresh_models(tok)
    method, rollout = _rollout(models, recipe)
    loss32, grad32 = _loss_and_grad(method, models, rollout, "fp32")
    seen = []
    real_rows = opd.step.student_rows

    def rows(*args, **kw):
        out = real_rows(*args, **kw)
        seen.append((out.hidden_ND.dtype, out.head_VD.dtype))
        return out

    monkeypatch.setattr(opd.step, "student_rows", rows)
    loss16, grad16 = _loss_and_grad(method, models, rollout, mode)
    assert seen == [(rows_dtype, rows_dtype)]  # the head's rows and weights in one dtype
    assert loss16 != loss32  # the decoder really ran under autocast: the numbers differ, but
    # only a little:
    assert abs(loss16 - loss32) <= LOSS_RTOL * abs(loss32), (loss16, loss32)
    assert grad16.dtype == torch.float32  # gradients land on the float32 master weights
    rel = float((grad16 - grad32).norm() / grad32.norm())
    assert 0 < rel <= GRAD_RTOL, rel
    assert all(p.dtype == torch.float32 for p in models.student.parameters())


def test_float32_logits_are_closer_to_the_float32_twin_than_bf16_logits(tok):
    """The reason float32 logits are the bf16 default: on the same micro-step their loss and
    gradient are nearer the float32 run's than those of bf16 logits (opd.precision)."""
    models = fresh_models(tok)
    method, rollout = _rollout(models, "on_policy_rkl")
    loss32, grad32 = _loss_and_grad(method, models, rollout, "fp32")
    err = {}
    for mode in ("bf16", "bf16-logits"):
        loss16, grad16 = _loss_and_grad(method, models, rollout, mode)
        err[mode] = (abs(loss16 - loss32), float((grad16 - grad32).norm() / grad32.norm()))
    assert err["bf16"][0] < err["bf16-logits"][0], err
    assert err["bf16"][1] < err["bf16-logits"][1], err


def test_bf16_logits_knob_selects_the_mode_and_needs_bf16(tmp_path, prompt_file, tok):
    cfg = tiny_cfg(tmp_path, prompt_file, "train.precision=bf16")
    assert opd.precision.mode(cfg.train) == "bf16"
    cfg = tiny_cfg(tmp_path, prompt_file, "train.precision=bf16", "train.bf16_logits=true")
    assert opd.precision.mode(cfg.train) == "bf16-logits"
    cfg = tiny_cfg(tmp_path / "b", prompt_file, "train.steps=1", "train.bf16_logits=true")
    with pytest.raises(ConfigError, match=r"bf16_logits=true .* train.precision=fp32"):
        distill(cfg, models=fresh_models(tok), evaluate=False, **QUIET)
    assert not (tmp_path / "b" / "run").exists()  # refused before the run folder is made


def test_bf16_run_keeps_float32_weights_and_optimizer_state(tmp_path, prompt_file, tok):
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=2", "train.precision=bf16")
    lines = []
    res = distill(cfg, models=fresh_models(tok), evaluate=False, log=lines.append)
    said = [x for x in lines if x.startswith("train.precision=bf16:")]
    assert len(said) == 1 and "logits in float32 (train.bf16_logits=false" in said[0]
    assert all(p.dtype == torch.float32 for p in res.models.student.parameters())
    ckpt = res.run_dir / "checkpoints" / "step_000002"
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    moments = [t for s in opt.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    assert {t.dtype for t in load_file(str(ckpt / "student.safetensors")).values()} == {
        torch.float32
    }
    assert all(abs(x) < 10 for x in res.losses) and res.losses[0] != 0


def test_bf16_with_narrow_weights_is_refused_in_one_line(tmp_path):
    dirs = save_tiny_models(tmp_path / "models")
    data = write_prompts(tmp_path / "p.jsonl", 8)
    argv = small_cli_args(tmp_path, dirs, data, "train.precision=bf16", "model.dtype=bfloat16")
    res = run_opd(["distill", *argv])
    assert_clean_error(res, "train.precision=bf16", "model.dtype=bfloat16", "float32")
    assert not (tmp_path / "run").exists()  # refused before the run folder is created


def test_bf16_on_a_device_without_bf16_is_refused(tmp_path, prompt_file, tok, monkeypatch):
    monkeypatch.setattr(opd.precision, "bf16_supported", lambda device: False)
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=1", "train.precision=bf16")
    with pytest.raises(ConfigError, match=r"device cpu cannot run bfloat16.*precision=fp32"):
        distill(cfg, models=fresh_models(tok), **QUIET)
    assert not (tmp_path / "run").exists()


def _grad_and_saved_bytes(tok, checkpointing: bool):
    models = fresh_models(tok)
    if checkpointing:
        enable_gradient_checkpointing(models.student)
    method, rollout = _rollout(models, "on_policy_rkl")
    saved = {}  # storage -> bytes of every tensor autograd keeps for the backward

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dec, head, _ = decoder_and_head(models.student, verify=False)
        hidden = dec(rollout.input_ids_BL, rollout.attention_mask_BL)
    del dec, head, hidden
    loss, grad = _loss_and_grad(method, models, rollout, "fp32")
    return loss, grad, sum(saved.values())


def test_gradient_checkpointing_same_loss_and_gradients_less_saved_memory(tok):
    loss, grad, saved = _grad_and_saved_bytes(tok, False)
    loss_ck, grad_ck, saved_ck = _grad_and_saved_bytes(tok, True)
    assert loss_ck == pytest.approx(loss, abs=1e-6)
    torch.testing.assert_close(grad_ck, grad, atol=1e-6, rtol=1e-6)
    # the decoder's activations kept for the backward (2 layers × 48 wide, 4 rows): measured
    # 450,960 B without, 28,272 B with checkpointing (plus each layer's input, which the
    # checkpoint holds itself: 2 × B·L·D·4 B)
    assert saved_ck < 0.5 * saved, (saved_ck, saved)


def test_gradient_checkpointing_run_matches_the_plain_run(tmp_path, prompt_file, tok):
    runs = [
        distill(
            tiny_cfg(tmp_path, prompt_file, "train.steps=3", *extra, name=f"r{i}"),
            models=fresh_models(tok),
            evaluate=False,
            **QUIET,
        )
        for i, extra in enumerate([(), ("train.gradient_checkpointing=true",)])
    ]
    assert runs[1].models.student.model.gradient_checkpointing
    for a, b in zip(runs[0].losses, runs[1].losses):
        assert abs(a - b) <= 1e-6, (runs[0].losses, runs[1].losses)
