"""Fully sharded students (`train.fsdp=true`): PyTorch FSDP2 (`fully_shard`) under torchrun.

Everything of `opd.distributed` (prompt sharding, per-row seeds, the global token count,
metrics, rank-0 writing) holds unchanged; what changes is where the student's parameters,
gradients and optimizer state live. With N processes:

    training copy   a copy of the student built on the meta device, `fully_shard` applied to
                    each decoder layer and then to a root module (`LossForward`) holding the
                    whole student, then given storage for its shards only, filled from the
                    loaded weights (`_fill`): every process keeps 1/N of each parameter
                    (dim 0), of its gradient and of the AdamW moments (DTensors on a 1-D
                    device mesh of N processes)
    loss            a micro-batch's whole loss (`opd.step.micro_step`: teacher scores, the
                    decoder, the chunked / one-pass losses) runs INSIDE the root's forward,
                    so FSDP's pre-forward all-gather has made the embeddings, final norm and
                    lm_head plain full tensors while the chunked loss multiplies completion
                    rows by the head weight (outside a forward they are sharded DTensors:
                    `aten.mm got mixed torch.Tensor and DTensor`); the decoder layers gather
                    their own shards in their forward and again in the backward
    gradients       reduce-scattered (averaged over processes, hence the backward scaled by N
                    as under DDP: the gradient of the global token mean) after EVERY
                    micro-batch's backward and accumulated as shards: skipping the sync until
                    the last micro-batch (`set_requires_gradient_sync(False)`, DDP's
                    `no_sync`) would keep a full unsharded gradient per process in between;
                    the gradient norm is the norm of the full gradient (`full`)
    inference copy  `models.student` stays an ordinary, unsharded module: rollouts (every
                    generation backend), teacher=self scoring, evaluation, samples, the
                    checkpoint and the saved student read it. After every optimizer step a
                    post-step hook gathers the updated parameters into it (`full_tensor()`
                    per parameter, a collective every process runs), so it always equals the
                    sharded weights
    checkpoints     the student from the inference copy and the optimizer state gathered to
                    full tensors one at a time (`full_optimizer_state`, a collective; only
                    rank 0 keeps them, on the CPU, and writes):
                    the SAME files as a 1-process or DDP run, so an FSDP checkpoint resumes
                    in one process (train.fsdp=true with one process shards nothing) or under
                    DDP, and the other way round; on resume every process loads the full
                    state into the inference copy and its optimizer, then `shard_run` copies
                    the weights into the sharded copy and cuts the AdamW moments into the
                    same shards (`distribute_tensor(..., src_data_rank=None)`: no messages)

Memory: per process, the sharded training copy holds 1/N of the weights, gradients and
optimizer state (float32 AdamW: 16 bytes per parameter → 16/N) plus one or two layers'
gathered parameters at a time; the inference copy adds one full set of weights (4 bytes per
float32 parameter) for the whole run: 4 + 16/N bytes per parameter instead of DDP's 16.
Transients: rank 0 holds the full optimizer state (8 bytes per parameter, CPU) while writing
a checkpoint; a resume loads full weights and optimizer state into every process before
cutting them. A GPU user whose student does not fit once per device generates with
`sampling.backend=vllm` (a separate engine fed with gathered weights) and would drop the
inference copy; that is not built here. Measured: benchmarks/bench_fsdp_memory.py.

Refused (`check_fsdp`, one line, before the run folder exists): LoRA students (peft wrappers
are not sharded here; LoRA already keeps only adapter state), the asynchronous pipeline (its
background thread would have to join the collectives) and cross-tokenizer teachers (not
tested). Everything else runs as under DDP.
"""

from __future__ import annotations

import copy

import torch

from opd.errors import ConfigError


def check_fsdp(cfg) -> None:
    """Refuse, in one line, settings that `train.fsdp=true` does not support."""
    if not cfg.train.fsdp:
        return
    for bad, why in (
        (cfg.model.lora_r > 0, f"model.lora_r={cfg.model.lora_r} (a LoRA student)"),
        (
            cfg.train.async_rollouts > 0,
            f"train.async_rollouts={cfg.train.async_rollouts} (the asynchronous pipeline)",
        ),
        (bool(cfg.model.teacher_tokenizer), "model.teacher_tokenizer (a cross-tokenizer teacher)"),
    ):
        if bad:
            raise ConfigError(
                f"train.fsdp=true does not support {why}; set train.fsdp=false (DDP) or "
                "drop that setting"
            )


class LossForward(torch.nn.Module):
    """The FSDP root: holds the student; its forward runs `pending()` (a micro-batch's loss),
    so the root's parameters (embeddings, final norm, lm_head) are gathered meanwhile."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student
        self.pending = None

    def forward(self):
        fn, self.pending = self.pending, None
        return fn()


def decoder_layers(student: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's layer list (`get_decoder().layers`; else the longest ModuleList)."""
    decoder = student.get_decoder() if hasattr(student, "get_decoder") else student
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    lists = [m for m in student.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ConfigError(
            f"train.fsdp=true: {type(student).__name__} has no list of decoder layers to "
            "shard; set train.fsdp=false"
        )
    return max(lists, key=len)


def full(t):
    """A DTensor's full value (a collective); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def refresh(plain: torch.nn.Module, sharded: torch.nn.Module) -> None:
    """Gather the sharded trainable parameters into the inference copy (every process)."""
    for p, q in zip(plain.parameters(), sharded.parameters(), strict=True):
        if p.requires_grad:
            p.copy_(full(q.detach()))


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict | None:
    """The optimizer's state_dict with every DTensor gathered to a full tensor on the CPU: the
    format of an unsharded optimizer over the same parameters. A collective: every process
    calls it; one tensor is gathered at a time, and a process with `keep=False` (not the
    writer) drops each at once and returns None, so only the writer ever holds it all."""
    sd = optimizer.state_dict()
    state: dict = {}
    for i, s in sd["state"].items():
        row = {k: full(v) for k, v in s.items()}
        if keep:
            state[i] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in row.items()}
    return {"state": state, "param_groups": sd["param_groups"]} if keep else None


def _shard_optimizer_state(sd: dict, params: list) -> dict:
    """A full (unsharded) optimizer state_dict cut into the layout of the sharded `params`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        state[i] = {
            k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape
            else v
            for k, v in s.items()
        }
    return {"state": state, "param_groups": sd["param_groups"]}


class Gathered:
    """Stands in for the optimizer in `save_checkpoint`: its full state, already gathered."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


@torch.no_grad()
def _fill(root: LossForward, plain: torch.nn.Module, device: torch.device) -> None:
    """Storage for the meta-built sharded copy, filled with this process's shards of the
    parameters of `plain` (no messages: every process holds the full weights) and its
    buffers (e.g. rotary frequencies, which `to_empty` leaves uninitialised)."""
    from torch.distributed.tensor import distribute_tensor

    root.to_empty(device=device)
    for q, p in zip(root.student.parameters(), plain.parameters(), strict=True):
        q.copy_(distribute_tensor(p.detach(), q.device_mesh, q.placements, src_data_rank=None))
    for qb, pb in zip(root.student.buffers(), plain.buffers(), strict=True):
        qb.copy_(pb)


def shard_run(run, dist) -> LossForward:
    """Shard a copy of `run.models.student` over the process group and move the run's
    optimizer and scheduler (with any restored state) onto the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    plain = run.models.student
    device = next(plain.parameters()).device
    mesh = init_device_mesh(device.type, (dist.world,))
    # the training copy: built on the meta device (no second full copy in memory), sharded,
    # then given storage for its shards only and filled from `plain`
    meta = {
        id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for p in plain.parameters()
    }
    twin = copy.deepcopy(plain, meta).train()  # only ever trained; `plain` is the inference copy
    for layer in decoder_layers(twin):
        fully_shard(layer, mesh=mesh)
    root = LossForward(twin)
    fully_shard(root, mesh=mesh)
    _fill(root, plain, device)
    params = [p for p in root.parameters() if p.requires_grad]
    tc, old_opt, old_sched = run.cfg.train, run.optimizer, run.scheduler
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, old_sched.lr_lambdas[0])
    opt.load_state_dict(_shard_optimizer_state(old_opt.state_dict(), params))
    sched.load_state_dict(old_sched.state_dict())
    opt.register_step_post_hook(lambda *_: refresh(plain, twin))
    run.params, run.optimizer, run.scheduler = params, opt, sched
    return root


def loss_in_forward(root: LossForward, fn):
    """`fn(method, models, ...)` (opd.step.micro_step) run inside the root's forward, with
    the sharded copy as `models.student`."""

    def call(method, models, *args, **kwargs):
        models = copy.copy(models)
        models.student = root.student
        root.pending = lambda: fn(method, models, *args, **kwargs)
        return root()

    return call
