"""LoRA students (model.lora_r > 0, opd/models/lora.py): only the adapters train, the lean
decoder runs them, the saved adapter and the merged model agree, resume is exact."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from opd.logs import read_metrics
from opd.models import decoder_and_head
from opd.sampling.backends.fast import FastBackend
from opd.train import distill
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
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_only_adapters_train_and_the_student_forward_uses_them(tmp_path, prompt_file, tok):
    models = fresh_models(tok)
    base = copy.deepcopy(models.student)
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=2", "model.lora_r=4", "train.lr=1e-2")
    res = distill(cfg, models=models, evaluate=False, **QUIET)
    student = res.models.student
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers × 7 projections × (A and B)
    assert len(trainable) == 2 * 7 * 2
    frozen = {
        n.removeprefix("base_model.model.").replace(".base_layer.", "."): p
        for n, p in student.named_parameters()
        if not p.requires_grad
    }
    base_params = dict(base.named_parameters())
    assert frozen.keys() == base_params.keys()
    for name, p in frozen.items():
        assert torch.equal(p, base_params[name]), name  # base weights bit-identical
    after = _logits(student)
    assert (after - _logits(base)).abs().max() > 1e-4  # ... and the adapters changed the output
    dec, head, _ = decoder_and_head(student, verify=False)
    with torch.no_grad():
        lean = dec(IDS) @ head.T
    torch.testing.assert_close(lean, after, atol=1e-5, rtol=1e-5)
    # the static-cache decoder reads raw weight matrices (it would skip the adapters): it
    # must decline a PEFT student, so rollouts come from Hugging Face generate
    assert FastBackend().reason(student) is not None


def test_lora_run_lowers_heldout_kl(tmp_path, prompt_file, tok):
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=12", "model.lora_r=4", "train.lr=2e-2")
    res = distill(cfg, models=fresh_models(tok), **QUIET)
    evals = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if r.get("event") == "eval"]
    before, after = evals[0]["heldout_kl"], evals[-1]["heldout_kl"]
    assert after < 0.8 * before, (before, after)  # measured 0.0221 -> 0.0125


def test_saved_adapter_on_the_base_equals_the_merged_student(tmp_path, prompt_file, tok):
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=2", "model.lora_r=4", "train.lr=1e-2")
    res = distill(cfg, models=fresh_models(tok), evaluate=False, **QUIET)
    folder = res.run_dir / "student"
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert (folder / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert not any("lora" in n for n in merged.state_dict())
    base = fresh_models(tok).student  # the same initial student
    adapted = PeftModel.from_pretrained(base, folder / "adapter")
    torch.testing.assert_close(_logits(adapted), _logits(merged), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(res.models.student), _logits(merged), atol=1e-5, rtol=1e-5)
    assert any(".lora_A." in n for n, _ in res.models.student.named_parameters())  # not merged


def test_lora_resume_reproduces_the_uninterrupted_run(tmp_path, prompt_file, tok):
    common = ("train.steps=4", "model.lora_r=4", "train.lr=1e-2")
    straight = distill(
        tiny_cfg(tmp_path, prompt_file, *common, name="a"),
        models=fresh_models(tok),
        evaluate=False,
        **QUIET,
    )
    first = distill(
        tiny_cfg(tmp_path, prompt_file, *common, name="b"),
        models=fresh_models(tok),
        stop_after=2,
        evaluate=False,
        **QUIET,
    )
    assert len(first.losses) == 2
    torch.manual_seed(1234)  # whatever happens in between must not matter
    resumed = distill(
        tiny_cfg(tmp_path, prompt_file, *common, name="b"),
        models=fresh_models(tok),
        resume=True,
        evaluate=False,
        **QUIET,
    )
    assert len(resumed.losses) == 4
    for a, b in zip(straight.losses, resumed.losses):
        assert abs(a - b) <= 1e-6, (straight.losses, resumed.losses)
    for (n, p), (_, q) in zip(
        straight.models.student.named_parameters(), resumed.models.student.named_parameters()
    ):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


@pytest.fixture
def cli_setup(tmp_path):
    dirs = save_tiny_models(tmp_path / "models")
    return dirs, write_prompts(tmp_path / "p.jsonl", 8)


def test_cli_bf16_with_lora_runs(tmp_path, cli_setup):
    dirs, data = cli_setup
    argv = small_cli_args(tmp_path, dirs, data, "train.precision=bf16", "model.lora_r=4")
    res = run_opd(["distill", *argv])
    assert res.code == 0, res.err + (res.traceback or "")
    assert "LoRA r=4" in res.out + res.err
    student = tmp_path / "run" / "student"
    assert (student / "adapter" / "adapter_model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(student).dtype == torch.float32


def test_unknown_lora_target_is_refused_in_one_line(tmp_path, cli_setup):
    dirs, data = cli_setup
    res = run_opd(
        [
            "distill",
            *small_cli_args(tmp_path, dirs, data, "model.lora_r=4", "model.lora_targets=qkv"),
        ]
    )
    assert_clean_error(res, "model.lora_targets", "qkv", "q_proj")
    assert not (tmp_path / "run").exists()


def test_gradient_checkpointing_reaches_the_adapters(tmp_path, prompt_file, tok):
    """Checkpointing a LoRA student: the adapters get gradients although the frozen
    embeddings' output does not require grad; the run equals the one without checkpointing."""
    common = ("train.steps=2", "model.lora_r=4", "train.lr=1e-2")
    runs = [
        distill(
            tiny_cfg(tmp_path, prompt_file, *common, *extra, name=f"r{i}"),
            models=fresh_models(tok),
            evaluate=False,
            **QUIET,
        )
        for i, extra in enumerate([(), ("train.gradient_checkpointing=true",)])
    ]
    assert runs[1].models.student.get_base_model().model.gradient_checkpointing
    for a, b in zip(runs[0].losses, runs[1].losses):
        assert abs(a - b) <= 1e-6, (runs[0].losses, runs[1].losses)
    for (n, p), (_, q) in zip(
        runs[0].models.student.named_parameters(), runs[1].models.student.named_parameters()
    ):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)
    lora_b = [p for n, p in runs[1].models.student.named_parameters() if ".lora_B." in n]
    assert all(bool(p.abs().sum() > 0) for p in lora_b)  # every adapter moved off B = 0
