"""Data-parallel training over processes: one student replica per process (PyTorch DDP).

Launched by `torchrun --nproc_per_node N -m opd distill ...` or `accelerate launch
--multi_gpu --num_processes N -m opd distill ...` (also on a CPU); both set WORLD_SIZE /
RANK / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT), which `Dist.from_env` reads.
WORLD_SIZE unset or 1 is the plain single-process run (no process group, nothing wrapped).
Backend: gloo on CPU, nccl on CUDA (each process on cuda:LOCAL_RANK).

What each process does, with N processes, per-process batch B and grad_accum A:

    prompts      every rank walks the SAME global prompt stream in micro-batches of B·N rows
                 and takes rows [r·B, (r+1)·B) of each (`shard_rows`); the global batch of a
                 step is B·A·N, and the stream position saved in a checkpoint is global
    sampling     row g of step s (g = m·B·N + r·B + i: micro-batch m, rank r, row i) samples
                 with its own torch.Generator seeded from (train.seed, s, g) (`row_seed`,
                 `opd.sampling.rows`), so a row's completion does not depend on how the rows
                 are split over processes or micro-batches
    loss         C = Σ over ranks and micro-batches of the counted tokens (or sequences):
                 one all_reduce before the first backward (`sum`); rank r's micro-batch loss
                 is Σ_local c·v / C, and its backward is scaled by N because DDP averages the
                 gradients over ranks: the synced gradient is ∇ Σ_r loss_r, the gradient of the
                 global token mean (not a mean of per-rank means)
    gradients    the student's decoder runs through `DistributedDataParallel` (`decoder`);
                 gradients are all-reduced once per step, on the last micro-batch's backward
                 (`sync_grads` sets DDP's `require_backward_grad_sync`, as `no_sync` does);
                 the head's gradient (used outside the decoder forward) is synced by the
                 same hooks
    metrics      loss, KL sum, tokens, lengths and the parts' numbers gathered and combined
                 over ranks (`combine`); every rank computes the same step row
    writing      only rank 0 creates the run folder and writes config, metrics, samples,
                 checkpoints and the final student; evaluation runs on rank 0 only (the
                 others wait at the next collective); a SIGINT/SIGTERM is agreed on by all
                 ranks before the loop acts on it (`any`)

Equal results: N processes with batch B equal one process with batch B·N (same grad_accum)
in per-step losses and final weights, up to float32 rounding (different padding widths),
for recipes whose randomness is per-row sampling through the generation backend plus
per-micro-batch coins of the global torch RNG (which every rank draws identically).
Not split-invariant: token-level mixing (`opd.sampling.interleaved`), replay buffers and
curricula keep per-process state or draw from the global RNG per row.

Fully sharded (`train.fsdp=true`, `opd.fsdp`): the same, except that the student's
parameters, gradients and optimizer state are sharded over the processes (FSDP2), the
loss runs inside the sharded root's forward (`loss_step`), an unsharded inference copy
serves rollouts, evaluation and saving, and checkpoints gather the optimizer state
(`saved_optimizer`) into the format above.

Errors: a rank that raises exits non-zero; torchrun (and accelerate, which runs it) then
stops the other ranks, which are blocked in a collective at the latest at the next step;
the process-group timeout (`OPD_DIST_TIMEOUT_MIN`, default 30 minutes) bounds any wait.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from opd.errors import ConfigError


def row_seed(seed: int, step: int, row: int) -> int:
    """A 63-bit generator seed for global row `row` of optimizer step `step`."""
    a, b = np.random.SeedSequence([seed, step, row]).generate_state(2, dtype=np.uint32)
    return ((int(a) << 32) | int(b)) & (2**63 - 1)


def env_world() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from the launcher's environment variables."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
        local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    except ValueError:
        raise ConfigError(
            "WORLD_SIZE / RANK / LOCAL_RANK must be integers (set by torchrun or accelerate launch)"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} does not fit WORLD_SIZE={world} (valid: 0..WORLD_SIZE-1)")
    return world, rank, local


def _timeout_minutes() -> float:
    text = os.environ.get("OPD_DIST_TIMEOUT_MIN", "30")
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise ConfigError(f"OPD_DIST_TIMEOUT_MIN={text!r}: give a number of minutes > 0")
    return minutes


@dataclass
class Dist:
    """The process group as the training loop sees it (world 1: every call is trivial)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False  # this object initialised the process group
    ddp: object = field(default=None, repr=False)  # DistributedDataParallel(decoder module)
    fsdp: bool = False  # train.fsdp: shard the student (opd.fsdp) instead of DDP
    root: object = field(default=None, repr=False)  # the FSDP root (opd.fsdp.LossForward)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, fsdp: bool = False) -> Dist:
        world, rank, local = env_world()
        if world == 1:
            return cls()
        import torch.distributed as tdist

        owns = False
        if not tdist.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(local)
            minutes = _timeout_minutes()
            tdist.init_process_group(
                backend="nccl" if cuda else "gloo",
                timeout=datetime.timedelta(minutes=minutes),
            )
            owns = True
        return cls(world, rank, local, owns, fsdp=fsdp)

    # ------------------------------------------------------------------ collectives

    def _tensor(self, values):
        dev = torch.device("cuda", self.local_rank) if self._nccl() else torch.device("cpu")
        return torch.tensor(values, dtype=torch.float64, device=dev)

    def _nccl(self) -> bool:
        import torch.distributed as tdist

        return tdist.get_backend() == "nccl"

    def sum(self, *values: float) -> list[float]:
        """Each value summed over ranks (float64)."""
        if self.world == 1:
            return [float(v) for v in values]
        import torch.distributed as tdist

        t = self._tensor([float(v) for v in values])
        tdist.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on some rank."""
        return self.sum(1.0 if flag else 0.0)[0] > 0

    def gather(self, obj) -> list:
        """`obj` of every rank (picklable), in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as tdist

        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as tdist

        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist

            tdist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()
            self.owns_group = False

    # ------------------------------------------------------------------ the student

    @property
    def kind(self) -> str:
        return "FSDP" if self.fsdp else "DDP"

    def wrap(self, run, log=print) -> None:
        """Wrap the student's decoder forward in DistributedDataParallel (world > 1), or
        with train.fsdp shard a training copy of it (`opd.fsdp.shard_run`, which moves
        `run.params`, `run.optimizer` and `run.scheduler` onto the shards).

        DDP broadcasts rank 0's parameters and buffers, so every replica starts equal
        (under FSDP every process loaded the same weights and checkpoint)."""
        if self.world == 1:
            if run.cfg.train.fsdp:
                log("train.fsdp=true in one process: nothing to shard, the student trains whole")
            return
        if self.fsdp:
            from opd.fsdp import shard_run

            self.root = shard_run(run, self)
            return
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self._nccl() else None
        self.ddp = DistributedDataParallel(_DecoderForward(run.models.student), device_ids=ids)

    def loss_step(self, fn):
        """`fn` (opd.step.micro_step), or under FSDP `fn` run inside the sharded root's
        forward (`opd.fsdp.loss_in_forward`)."""
        if self.root is None:
            return fn
        from opd.fsdp import loss_in_forward

        return loss_in_forward(self.root, fn)

    def saved_optimizer(self, optimizer):
        """What a checkpoint saves of `optimizer`: itself, or under FSDP its state gathered to
        full tensors (a collective: every process calls this, rank 0 writes)."""
        if self.root is None:
            return optimizer
        from opd.fsdp import Gathered, full_optimizer_state

        return Gathered(full_optimizer_state(optimizer, keep=self.is_main))

    def decoder(self):
        """The callable `(input_ids, attention_mask) -> hidden_BLD` through DDP, or None."""
        return self.ddp

    def sync_grads(self, last: bool) -> None:
        """Before a micro-batch's forward: all-reduce its gradients in the backward only when
        it is the step's last (what `DistributedDataParallel.no_sync` sets for the others)."""
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = last
        # FSDP reduce-scatters on every backward: accumulating unsharded gradients over the
        # micro-batches (`set_requires_gradient_sync(False)`) would hold a full gradient per
        # process between them (opd.fsdp)

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), scaled by N: DDP (and FSDP) average gradients, the loss is a global
        sum."""
        (loss * self.world if self.world > 1 else loss).backward()


class _DecoderForward(torch.nn.Module):
    """The student's decoder (final norm included) as a module whose forward DDP can run;
    its parameters are the whole student's, the head included."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student

    def forward(self, input_ids, attention_mask=None):
        from opd.models import decoder_and_head

        dec, _, _ = decoder_and_head(self.student, verify=False)
        return dec(input_ids, attention_mask)


SINGLE = Dist()


def shard_rows(examples: Sequence, dist: Dist, seed: int, step: int, micro: int):
    """This rank's rows of a global micro-batch, and each row's sampling seed.

    Rows [r·B, (r+1)·B) of the G = B·N rows go to rank r; row i's seed is
    `row_seed(seed, step, micro·G + r·B + i)`."""
    g = len(examples)
    if g % dist.world:
        raise ConfigError(
            f"a global micro-batch of {g} prompts does not split over {dist.world} processes "
            "(valid: a prompt selector that returns train.batch_size × WORLD_SIZE rows)"
        )
    b = g // dist.world
    first = micro * g + dist.rank * b
    local = list(examples[dist.rank * b : (dist.rank + 1) * b])
    return local, [row_seed(seed, step, first + i) for i in range(b)]


def combine(parts: list[dict]) -> dict:
    """One step's numbers over ranks: sums of loss, kl_sum, tokens, length sum/count; the
    parts' own numbers (`info`) averaged over the ranks that reported them."""
    out = {k: sum(p[k] for p in parts) for k in ("loss", "kl_sum", "tokens", "len_sum", "len_n")}
    info: dict = {}
    for p in parts:
        for k, v in p["info"].items():
            info.setdefault(k, []).append(v)
    out["info"] = {k: sum(v) / len(v) for k, v in info.items()}
    return out


# ------------------------------------------------------------------ resume with another N


def saved_world(run_dir: Path) -> int | None:
    """The process count that wrote the run's newest checkpoint (None: unknown)."""
    ckpt = Path(run_dir) / "checkpoints"
    try:
        name = (ckpt / "latest").read_text().strip()
        state = json.loads((ckpt / name / "state.json").read_text())
    except (OSError, ValueError):
        return None
    world = state.get("world_size", 1) if isinstance(state, dict) else None
    return world if isinstance(world, int) and world >= 1 else None


def same_global_batch(run_dir, saved: dict, now: dict) -> bool:
    """On --resume: the new batch_size × grad_accum × WORLD_SIZE equals the checkpoint's
    (so train.batch_size / train.grad_accum may change with the process count)."""
    before = saved_world(run_dir)
    if before is None:
        return False
    s, n = saved["train"], now["train"]
    return s["batch_size"] * s["grad_accum"] * before == (
        n["batch_size"] * n["grad_accum"] * env_world()[0]
    )
