"""Data-parallel training (opd.distributed): 2 processes through torchrun (gloo, 127.0.0.1)
against 1 process with the same global batch, and resuming across process counts.

One torchrun launch runs every 2-process job (tests/ddp_worker.py) to pay the process
start-up once; the 1-process twins run in this process. The launch-based tests are marked
slow (about 50 s of wall time together, 25 s of CPU); per-row sampling and sharding are
checked in-process by the fast ones.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.config import load_config, load_run_config
from opd.train import distill
from tests.helpers import save_tiny_models, write_prompts

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("gkd", "seqkd", "topk_rkl")
ACCUM = {"gkd": 1, "seqkd": 1, "topk_rkl": 2}  # 2: gradients synced on the last micro-batch
STEPS = 3


# ------------------------------------------------------------ in-process pieces (fast)


def test_a_rows_completion_does_not_depend_on_its_batch(tiny_models):
    """Inside `row_seeds`, row b samples from its own generator: the same tokens in a batch
    of 4 or split 2 + 2, from the fast decoder and from Hugging Face `generate` alike, and
    the generation leaves the global torch RNG where it was."""
    from opd.sampling import FastBackend, GenerationParams, HFBackend
    from opd.sampling.rows import row_seeds

    _, student, tok = tiny_models
    prompts = [tok.encode(p) for p in ("1+2=", "33+4=", "5+6=", "7777+8=")]
    params = GenerationParams(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9)
    seeds = [11, 22, 33, 44]
    outs = []
    for backend in (FastBackend(), HFBackend()):
        before = torch.get_rng_state()
        with row_seeds(seeds):
            full = backend.generate(student, prompts, params, pad_id=0, stop_ids=[2])
        assert torch.equal(before, torch.get_rng_state())
        halves = []
        for lo in (0, 2):
            with row_seeds(seeds[lo : lo + 2]):
                halves += backend.generate(
                    student, prompts[lo : lo + 2], params, pad_id=0, stop_ids=[2]
                )
        assert full == halves
        outs.append(full)
    assert outs[0] == outs[1]
    with row_seeds([5, 6, 7, 8]):  # other seeds, other tokens
        assert FastBackend().generate(student, prompts, params, pad_id=0, stop_ids=[2]) != outs[0]
    # the coins a rollout draws itself (GKD's mixture) still advance the global RNG
    before = torch.get_rng_state()
    with row_seeds(seeds):
        torch.rand(())
    assert not torch.equal(before, torch.get_rng_state())


def test_shards_of_a_global_micro_batch_are_the_single_process_rows():
    from opd.distributed import Dist, row_seed, shard_rows
    from opd.errors import ConfigError

    rows = list("abcdef")
    one = shard_rows(rows, Dist(), seed=3, step=7, micro=1)
    two = [shard_rows(rows, Dist(world=2, rank=r), seed=3, step=7, micro=1) for r in (0, 1)]
    assert one[0] == two[0][0] + two[1][0] == rows
    assert one[1] == two[0][1] + two[1][1] == [row_seed(3, 7, 6 + i) for i in range(6)]
    assert len(set(one[1])) == 6 and row_seed(3, 8, 6) != row_seed(3, 7, 6)
    with pytest.raises(ConfigError, match="does not split over 4 processes"):
        shard_rows(rows, Dist(world=4, rank=1), seed=3, step=7, micro=0)


# ------------------------------------------------------------ torchrun launches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _overrides(base: Path, models, data, name: str, recipe: str, batch: int) -> list[str]:
    """A 3-step run; grad_accum from ACCUM (1 for the resume jobs' gkd)."""
    t, s = models
    return [
        f"model.teacher={t}",
        f"model.student={s}",
        f"data.train={data}",
        f"data.eval={data}",
        "data.eval_count=4",
        "data.chat_template=false",
        f"method.recipe={recipe}",
        f"train.steps={STEPS}",
        f"train.batch_size={batch}",
        f"train.grad_accum={ACCUM[recipe]}",
        "train.lr=3e-3",
        "train.progress=false",
        "sampling.max_new_tokens=5",
        f"output_dir={base / name}",
    ]


def _one(overrides, resume=None, stop_after=None):
    """A 1-process run in this process; returns its per-step losses and the student."""
    cfg = load_run_config(resume, overrides) if resume else load_config(None, overrides)
    res = distill(cfg, resume=bool(resume), stop_after=stop_after, evaluate=False, log=_quiet)
    return res.losses, res.models.student


def _quiet(*args, **kwargs):
    pass


_REFERENCE: dict = {}


def _reference(launched, recipe):
    """The 1-process run with the global batch (4) of the 2 × 2 runs, once per recipe."""
    base, models, data, _ = launched
    if recipe not in _REFERENCE:
        _REFERENCE[recipe] = _one(_overrides(base, models, data, f"one_{recipe}", recipe, 4))
    return _REFERENCE[recipe]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Every 2-process job in one torchrun launch; the folders and rank 0's results."""
    base = tmp_path_factory.mktemp("ddp")
    models = save_tiny_models(base / "models")
    data = write_prompts(base / "prompts.jsonl", n=20)
    # a 1-process checkpoint (global batch 4, 1 step) for the 2 processes to resume
    _one(_overrides(base, models, data, "one_then_two", "gkd", 4), stop_after=1)
    jobs = [{"overrides": _overrides(base, models, data, f"two_{r}", r, 2)} for r in RECIPES]
    jobs.append({"overrides": ["train.batch_size=2"], "resume": str(base / "one_then_two")})
    two_then_one = _overrides(base, models, data, "two_then_one", "gkd", 2)
    jobs.append({"overrides": two_then_one, "stop_after": 1})
    failing = _overrides(base, models, data, "rank1_fails", "gkd", 2)
    jobs.append({"overrides": [*failing, "train.checkpoint_every=1"], "fail_rank1_at": 1})
    (base / "jobs.json").write_text(json.dumps(jobs))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(ROOT / "tests" / "ddp_worker.py"), str(base / "jobs.json"), str(base / "out.jsonl"),
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    _FAILED.update(code=proc.returncode, err=proc.stderr, after=time.monotonic() - t0)
    rows = [json.loads(x) for x in (base / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 5, proc.stdout[-3000:] + proc.stderr[-5000:]  # the last job fails
    return base, models, data, rows


_FAILED: dict = {}


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_student(run_dir: Path, student) -> None:
    saved = load_file(str(run_dir / "student" / "model.safetensors"))
    own = student.state_dict()
    for k, v in saved.items():
        torch.testing.assert_close(v, own[k], rtol=1e-4, atol=2e-5, msg=k)


@pytest.mark.slow  # one torchrun launch (~50 s wall, ~25 s CPU) for all four
@pytest.mark.parametrize("recipe", RECIPES)
def test_two_processes_equal_one_with_the_same_global_batch(launched, recipe):
    base, models, data, rows = launched
    two = rows[RECIPES.index(recipe)]
    losses, student = _reference(launched, recipe)
    assert len(two["losses"]) == STEPS and two["main"] is True
    assert two["losses"] == pytest.approx(losses, rel=1e-4, abs=1e-6)
    _assert_same_student(Path(two["run_dir"]), student)
    # rank 0 alone wrote the run: one row per step, a checkpoint that knows the process count
    run = Path(two["run_dir"])
    steps = _rows(run)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["loss"] for r in steps] == pytest.approx(losses, rel=1e-4, abs=1e-6)
    # the numbers reduced over ranks: the gradient norm (global token mean: DDP's average
    # times N), the tokens, the KL and the completion length
    ref = _rows(base / f"one_{recipe}")
    for key in ("grad_norm", "teacher_kl", "tokens", "completion_length"):
        assert [r[key] for r in steps] == pytest.approx([r[key] for r in ref], rel=1e-4), key
    start = load_file(str(models[1] / "model.safetensors"))  # training moved the student
    assert max(float((v - student.state_dict()[k]).abs().max()) for k, v in start.items()) > 1e-4
    state = json.loads((run / "checkpoints" / "step_000003" / "state.json").read_text())
    assert (state["world_size"], state["global_batch"]) == (2, 4 * ACCUM[recipe])
    assert state["data"]["index"] == (STEPS * 4 * ACCUM[recipe]) % 20  # in the global stream


@pytest.mark.slow  # one torchrun launch (~50 s wall, ~25 s CPU) for all four
def test_one_process_checkpoint_resumes_in_two(launched):
    base, models, data, rows = launched
    resumed = rows[3]
    losses, student = _reference(launched, "gkd")
    assert resumed["losses"] == pytest.approx(losses, rel=1e-4, abs=1e-6)
    _assert_same_student(base / "one_then_two", student)
    state = json.loads((base / "one_then_two/checkpoints/step_000003/state.json").read_text())
    assert state["world_size"] == 2


@pytest.mark.slow  # one torchrun launch (~50 s wall, ~25 s CPU) for all four
def test_two_process_checkpoint_resumes_in_one(launched):
    base, models, data, rows = launched
    assert rows[4]["losses"] and len(rows[4]["losses"]) == 1
    run = base / "two_then_one"
    snapshot = base / "two_then_one_copy"
    shutil.copytree(run, snapshot)
    # one process, batch 4: the global batch of the 2 × 2 run; the stream position is global
    losses, student = _one(["train.batch_size=4"], resume=run)
    ref_losses, ref_student = _reference(launched, "gkd")
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-6)
    _assert_same_student(run, ref_student)
    # the same global batch is required to change train.batch_size on resume
    from opd.errors import ConfigError

    with pytest.raises(ConfigError, match="train.batch_size=3"):
        load_run_config(snapshot, ["train.batch_size=3"])


@pytest.mark.slow  # one torchrun launch (~50 s wall, ~25 s CPU) for all four
def test_an_error_on_rank_1_stops_both_processes(launched):
    """Rank 1 raises in step 2 while rank 0 waits in the gradient all-reduce: the launch
    ends (no hang) with a non-zero exit code and rank 1's error; rank 0's checkpoint of step
    1 stays, no student is written."""
    base = launched[0]
    assert _FAILED["code"] != 0
    assert "NonFiniteError: step 2: injected failure on rank 1" in _FAILED["err"]
    run = base / "rank1_fails"
    assert (run / "checkpoints" / "step_000001").is_dir()
    assert not (run / "checkpoints" / "step_000002").exists() and not (run / "student").exists()


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m opd distill` on a CPU: accelerate
    starts 2 processes through torchrun and opd picks gloo. (accelerate 1.x's
    `--cpu --num_processes 2` starts ONE process unless an MPI hostfile is given.)"""
    t, s = save_tiny_models(tmp_path / "models")
    data = write_prompts(tmp_path / "prompts.jsonl", n=12)
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = [str(accelerate)] if accelerate.exists() else [sys.executable, "-m", "accelerate"]
    cmd = [
        *launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(_free_port()), "-m", "opd", "distill",
        f"model.teacher={t}", f"model.student={s}", f"data.train={data}", "data.eval_count=2",
        "train.steps=2", "train.batch_size=2", "sampling.max_new_tokens=3",
        "train.progress=false", f"output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run = tmp_path / "run"
    assert proc.stdout.count("student saved to") == 1  # rank 0 alone logs and writes
    assert "2 processes (DDP, 2 prompts each): global batch 4" in proc.stdout
    assert [r["step"] for r in _rows(run) if "loss" in r] == [1, 2]
    state = json.loads((run / "checkpoints" / "step_000002" / "state.json").read_text())
    assert (state["world_size"], state["data"]["index"]) == (2, 8)
    assert (run / "student" / "model.safetensors").is_file() and (run / "report.md").is_file()
