"""Fully sharded students (`train.fsdp=true`, opd.fsdp): 2 FSDP2 processes through torchrun
(gloo, 127.0.0.1) against 1 unsharded process with the same global batch, and checkpoints
resumed across the two.

One torchrun launch (tests/fsdp_worker.py, which runs tests/ddp_worker.py's jobs and records
the shards) runs every 2-process job; the 1-process twins run in this process. The launch
is marked slow (about 30 s of wall time on this machine); the refusals and the 1-process
run are fast.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import (
    assert_clean_error,
    run_opd,
    save_tiny_models,
    small_cli_args,
    write_prompts,
)
from tests.test_ddp import (
    ACCUM,
    STEPS,
    _assert_same_student,
    _env,
    _free_port,
    _one,
    _overrides,
    _rows,
)

ROOT = Path(__file__).resolve().parents[1]
FSDP = ["train.fsdp=true"]
RECIPES = ("gkd", "topk_rkl")
# topk_rkl: grad_accum 2 (gradient shards accumulated over micro-batches) and gradient
# checkpointing (the layers gather their shards again in the recompute) and no clipping (the
# norm of DTensor gradients computed by hand); its twin has none of them (its gradient norms,
# about 0.02, are never clipped at the default 1.0, so the runs stay equal)
EXTRA = {
    "gkd": [],
    "topk_rkl": ["train.gradient_checkpointing=true", "train.max_grad_norm=0"],
}


@pytest.mark.parametrize(
    "extra, needle",
    [(["model.lora_r=4"], "model.lora_r=4"), (["train.async_rollouts=1"], "async_rollouts=1")],
)
def test_unsupported_settings_are_refused_before_anything_is_written(tmp_path, extra, needle):
    models = (tmp_path / "no_teacher", tmp_path / "no_student")  # never loaded: refused first
    data = write_prompts(tmp_path / "p.jsonl", n=4)
    res = run_opd(["distill", *small_cli_args(tmp_path, models, data, *FSDP, *extra)])
    line = assert_clean_error(res, "train.fsdp=true", needle)
    assert "train.fsdp=false" in line
    assert not (tmp_path / "run").exists()


_REFERENCE: dict = {}


def _reference(launched, recipe):
    """The 1-process unsharded run with the global batch (4) of the 2 × 2 runs, in this
    module's folder (tests/test_ddp.py keeps its own, in its folder)."""
    base, models, data = launched[:3]
    if recipe not in _REFERENCE:
        _REFERENCE[recipe] = _one(_overrides(base, models, data, f"one_{recipe}", recipe, 4))
    return _REFERENCE[recipe]


def _tied_student(folder: Path) -> Path:
    from opd.tiny import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    model = tiny_llama(len(tok), hidden=48, layers=2, seed=2, tie_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Every 2-process FSDP job in one torchrun launch; the folders, rank 0's results and
    the recorded shards."""
    base = tmp_path_factory.mktemp("fsdp")
    models = save_tiny_models(base / "models")
    data = write_prompts(base / "prompts.jsonl", n=20)
    # a 1-process checkpoint (unsharded, global batch 4, 1 step) for 2 FSDP processes
    _one(_overrides(base, models, data, "one_then_two", "gkd", 4), stop_after=1)
    jobs = [
        {"overrides": _overrides(base, models, data, f"two_{r}", r, 2) + FSDP + EXTRA[r]}
        for r in RECIPES
    ]
    jobs.append({"overrides": ["train.batch_size=2", *FSDP], "resume": str(base / "one_then_two")})
    two_then_one = _overrides(base, models, data, "two_then_one", "gkd", 2)
    jobs.append({"overrides": two_then_one + FSDP, "stop_after": 1})
    tied = _tied_student(base / "tied")  # lm_head.weight is embed_tokens.weight
    jobs.append(
        {"overrides": _overrides(base, (models[0], tied), data, "two_tied", "gkd", 2) + FSDP}
    )
    (base / "jobs.json").write_text(json.dumps(jobs))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(ROOT / "tests" / "fsdp_worker.py"), str(base / "jobs.json"), str(base / "out.jsonl"),
        str(base / "shards.jsonl"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(x) for x in (base / "out.jsonl").read_text().splitlines()]
    shards = [json.loads(x) for x in (base / "shards.jsonl").read_text().splitlines()]
    assert len(rows) == len(shards) == 5
    return base, models, data, rows, shards


@pytest.mark.slow  # one torchrun launch (~25 s wall) for the three
@pytest.mark.parametrize("recipe", RECIPES)
def test_two_fsdp_processes_equal_one_with_the_same_global_batch(launched, recipe):
    base, models, data, rows, shards = launched
    two = rows[RECIPES.index(recipe)]
    losses, student = _reference(launched, recipe)
    assert len(two["losses"]) == STEPS and two["main"] is True
    assert two["losses"] == pytest.approx(losses, rel=1e-4, abs=1e-6)
    run = Path(two["run_dir"])
    _assert_same_student(run, student)  # the saved student: gathered full weights
    ref = _rows(base / f"one_{recipe}")
    for key in ("grad_norm", "teacher_kl", "tokens", "completion_length"):
        assert [r[key] for r in _rows(run)] == pytest.approx([r[key] for r in ref], rel=1e-4)
    start = load_file(str(models[1] / "model.safetensors"))  # training moved the student
    assert max(float((v - student.state_dict()[k]).abs().max()) for k, v in start.items()) > 1e-4
    # the checkpoint is an ordinary one: full tensors, the optimizer keyed like one process
    ckpt = run / "checkpoints" / "step_000003"
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["world_size"], state["global_batch"]) == (2, 4 * ACCUM[recipe])
    import torch

    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]
    saved = load_file(str(ckpt / "student.safetensors"))
    names = [n for n, _ in student.named_parameters()]
    assert sorted(opt["state"]) == list(range(len(names)))
    for i, name in enumerate(names):
        assert type(opt["state"][i]["exp_avg"]) is torch.Tensor
        assert opt["state"][i]["exp_avg"].shape == saved[name].shape, name
    # every parameter was sharded: rank 0 held ceil(rows / 2) rows of each; the inference
    # copy (rollouts, evaluation, saving) stayed unsharded
    for name, (full, local, kind) in shards[RECIPES.index(recipe)]["root"].items():
        assert kind == "DTensor" and local == [math.ceil(full[0] / 2), *full[1:]], name
    assert shards[0]["plain"] == ["Parameter"]


@pytest.mark.slow  # the same launch
def test_checkpoints_move_between_fsdp_and_one_unsharded_process(launched):
    base, models, data, rows, shards = launched
    ref_losses, ref_student = _reference(launched, "gkd")
    # a 1-process checkpoint resumed by 2 FSDP processes (weights and AdamW moments sharded)
    assert rows[2]["losses"] == pytest.approx(ref_losses, rel=1e-4, abs=1e-6)
    _assert_same_student(base / "one_then_two", ref_student)
    # a 2-process FSDP checkpoint resumed in 1 process (its config says train.fsdp=true)
    assert len(rows[3]["losses"]) == 1
    losses, student = _one(["train.batch_size=4"], resume=base / "two_then_one")
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-6)
    _assert_same_student(base / "two_then_one", ref_student)


def test_one_process_with_fsdp_trains_the_student_whole(tmp_path):
    """Without a launcher there is nothing to shard: the run says so and trains as usual."""
    models = save_tiny_models(tmp_path / "models")
    data = write_prompts(tmp_path / "p.jsonl", n=8)
    res = run_opd(["distill", *small_cli_args(tmp_path, models, data, *FSDP, "data.eval_count=0")])
    assert res.code == 0, res.err[-3000:]
    assert "train.fsdp=true in one process: nothing to shard" in res.out
    assert "FSDP" not in res.out  # no "N processes (FSDP ...)" line
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()


@pytest.mark.slow  # the same launch
def test_a_tied_head_is_sharded_once_and_trains_as_in_one_process(launched):
    base, models, data, rows, shards = launched
    tied = (models[0], base / "tied")
    losses, student = _one(_overrides(base, tied, data, "one_tied", "gkd", 4))
    assert rows[4]["losses"] == pytest.approx(losses, rel=1e-4, abs=1e-6)
    _assert_same_student(base / "two_tied", student)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    # one sharded parameter for the two modules (FSDP's root unit holds it once)
    names = set(shards[4]["root"])
    assert "student.model.embed_tokens.weight" in names
    assert "student.lm_head.weight" not in names
