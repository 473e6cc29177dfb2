"""Setting up a run: validate everything, then create the run folder, then restore state.

Order (so a failed start leaves nothing behind and an interrupted one loses nothing):

1. the output folder is checked (not a file, not under a file, writable) and a folder that
   already holds a run is refused unless resuming;
2. the method, the models (vocabulary size computed when 0; pure float16 training refused)
   and the data are built and checked against each other;
3. only then is the folder created and, for a new run, config.yaml written;
4. on resume, the newest usable checkpoint is restored (damaged ones are skipped with a
   warning, `opd.checkpoint.load_newest`); a run folder without any checkpoint starts from
   step 0 with its saved config, and says so.

The run's first log lines name the teacher, the student and the data sources.

Data-parallel (`opd.distributed`): every process validates and builds the same models; only
rank 0 creates the folder and writes config.yaml, the metrics and the trackers (the others
get a `NullLog`); every process restores the same checkpoint; the student's decoder is then
wrapped in DDP. The prompt stream yields global micro-batches of batch_size × N rows.
"""

from __future__ import annotations

import errno
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch

from opd.build import Models, PromptSets, build_data, build_models
from opd.checkpoint import load_newest
from opd.config import RunConfig, resolve_steps, save_config, to_dict
from opd.context import StepContext
from opd.crosstok.models import check_pair
from opd.distributed import SINGLE, Dist
from opd.errors import ConfigError, ModelError
from opd.evaluate import generic_verify
from opd.logs import MetricsLog
from opd.method import Method
from opd.models import shared_vocab_size
from opd.parts import Preparable, Stateful
from opd.pipeline_state import check_async, resume_queue
from opd.precision import setup_student
from opd.recipes import get_recipe
from opd.samples import truncate_samples
from opd.sampling import GenerationParams, make_backend
from opd.stream import PromptStream
from opd.teachers.base import check_teacher_serves, method_needs, teacher_model
from opd.tracking import open_trackers, parse_log_to

EMBEDDED = "embedded SmolLM2-135M-Instruct"


@dataclass
class Run:
    """Everything one training session works with."""

    cfg: RunConfig
    run_dir: Path
    models: Models
    data: PromptSets
    method: Method
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    stream: PromptStream
    ctx: StepContext  # the one context every part reads; `step` is set per step
    device: torch.device
    start_step: int = 0
    losses: list = field(default_factory=list)
    metrics_log: MetricsLog | None = None
    dist: Dist = field(default_factory=Dist)  # the process group (opd.distributed)

    @property
    def verify(self):
        """The task's verifier (the context's; evaluation reads it too)."""
        return self.ctx.verify

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"


def check_output_dir(run_dir: Path, resume: bool) -> None:
    """One-line errors for an output folder that is a file, under a file or not writable."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir '{run_dir}' is a file; give a folder path")
    parent = run_dir
    while not parent.exists():
        if parent.is_symlink():  # a dangling link
            raise ConfigError(f"output_dir '{run_dir}': '{parent}' is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(
            f"output_dir '{run_dir}' is under '{parent}', which is a file; give a folder path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir '{run_dir}': '{parent}' is not writable")
    if not resume and ((run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()):
        raise ConfigError(
            f"output_dir '{run_dir}' already holds a run; pass --resume {run_dir} to continue "
            "it or choose another output_dir"
        )


def make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".opd-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        why = "no space left on device" if err.errno == errno.ENOSPC else err.strerror or err
        raise ConfigError(f"output_dir '{run_dir}' cannot be written: {why}") from None


def finish_vocab(models: Models) -> Models:
    """Compute `vocab_size` when it is 0; refuse one larger than a head or the tokenizer."""
    tok = models.tokenizer
    local = teacher_model(models.teacher)
    members = list(getattr(local, "members", [local])) if local is not None else [models.student]
    if getattr(models, "teacher_tokenizer", None) is not None:  # [crosstok] student's own V
        members = [models.student]
    shared = min(shared_vocab_size(models.student, tok, m, tok) for m in members)
    if models.vocab_size == 0:
        models.vocab_size = shared
    elif not 0 < models.vocab_size <= shared:
        raise ModelError(
            f"Models.vocab_size={models.vocab_size} does not fit the models: the heads and "
            f"the tokenizer share {shared} rows (valid: 1..{shared}, or 0 to compute it)"
        )
    return models


def check_self_teacher(method: Method, models: Models) -> None:
    """[self-distillation] With model.teacher=self (the teacher IS the student) refuse a
    recipe that asks the teacher for anything: it would distill the student into itself."""
    needs = method_needs(method)
    if models.teacher is models.student and needs:
        raise ConfigError(
            f"model.teacher=self: recipe {method.name!r} asks the teacher for "
            f"{', '.join(sorted(needs))}, and there is no teacher but the student; use a "
            "self-distillation recipe (opsd, opcd, opsdc) or grpo, or name a teacher model"
        )


def check_trainable_dtype(models: Models) -> None:
    """Pure float16 training with AdamW is refused (no loss scaler; it overflows)."""
    dtype = next(models.student.parameters()).dtype
    if dtype == torch.float16:
        raise ConfigError(
            "model.dtype=float16: pure float16 training with AdamW overflows (opd has no loss "
            "scaler); use model.dtype=bfloat16 or float32"
        )


def check_data_fits(method: Method, data: PromptSets) -> None:
    if not data.train:
        raise ConfigError("data.train: no training prompts")
    check = getattr(method.prefixes, "check_data", None)  # [self-distillation] e.g. a row
    if check is not None:  # without the privileged field the teacher is shown
        check(data.train)
    if method.prefixes.needs_completions:
        missing = [ex.source for ex in data.train if ex.completion_ids is None]
        if missing:
            raise ConfigError(
                f"recipe {method.name!r} trains on dataset completions "
                f"({method.prefixes.describe()}), but {len(missing)} rows have none (first: "
                f"{missing[0]}); add a 'completion' field or pick an on-policy recipe"
            )


def data_warnings(cfg: RunConfig, data: PromptSets) -> list[str]:
    """Settings that run but probably measure or train something else than intended."""
    out, tc, d = [], cfg.train, cfg.data
    if tc.batch_size > len(data.train):
        out.append(
            f"train.batch_size={tc.batch_size} is larger than the {len(data.train)} training "
            "prompts: every batch repeats prompts"
        )
    if d.eval and d.eval == d.train and data.eval:
        out.append(
            f"data.eval is data.train ('{d.train}'): the held-out numbers are measured on "
            "training prompts (leave data.eval empty to hold out rows of data.train)"
        )
    return out


def source_lines(cfg: RunConfig, models_given: bool, data: PromptSets | None) -> list[str]:
    """The run's first lines: where the teacher, student and data come from (`data`: the
    prompt sets built from `cfg.data`, None when they were given in code)."""
    m = cfg.model
    if models_given:
        teacher = student = "given in code (models=...)"
    else:
        teacher = (
            f"{EMBEDDED} (the default; set model.teacher)" if m.teacher == "embedded" else m.teacher
        )
        student = m.student or (
            f"pruned from the teacher: {m.student_layers} layers (model.student_layers)"
        )
    lines = [f"teacher: {teacher}", f"student: {student}"]
    if data is None or not data.describe():
        lines.append("data: given in code (train=..., eval=...)")
    else:
        lines += data.describe()
    return lines


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_method(cfg: RunConfig) -> Method:
    return get_recipe(cfg.method.recipe).build(**cfg.method.args)


def _stateful_components(method: Method) -> dict:
    """Parts of a method that keep state across steps (replay buffers, curricula)."""
    parts = {"prompts": method.prompts, "prefixes": method.prefixes, "signal": method.signal}
    parts["teacher"] = method.teacher  # [self-distillation] e.g. an EMA self-teacher
    parts.update({f"weight{i}": w for i, w in enumerate(method.weights)})
    return {k: v for k, v in parts.items() if isinstance(v, Stateful)}


def component_states(method: Method) -> dict:
    """JSON-serialisable states of the stateful parts, saved in each checkpoint."""
    return {k: v.state_dict() for k, v in _stateful_components(method).items()}


def load_component_states(method: Method, states: dict) -> None:
    for k, v in _stateful_components(method).items():
        if k in states:
            v.load_state_dict(states[k])


class NullLog:
    """The metrics log of a process other than rank 0: writes nothing."""

    trackers = None

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def setup_run(
    cfg, run_dir, *, models=None, method=None, data=None, resume=False, log=print, dist=SINGLE
):
    """Validate, create the folder, build the optimizer and restore a checkpoint: a `Run`."""
    tc = cfg.train
    check_output_dir(run_dir, resume or not dist.is_main)  # rank 0 may have written already
    parse_log_to(tc.log_to)  # an unknown tracker or a missing package fails before anything
    if resume and not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume: '{run_dir}' is not a run folder (no config.yaml)")
    torch.manual_seed(tc.seed)
    models_given = models is not None
    method = method or build_method(cfg)
    models = finish_vocab(models or build_models(cfg))
    check_teacher_serves(method, models.teacher)  # e.g. a served teacher gives no full logits
    check_self_teacher(method, models)
    check_trainable_dtype(models)
    check_pair(models, method, cfg)  # [crosstok] another tokenizer needs a cross-tokenizer method
    if tc.async_rollouts:  # a background producer cannot serve every method (opd.pipeline)
        check_async(method, models)
    setup_student(models, cfg, log)  # LoRA wrap, gradient checkpointing, precision (issue 13)
    data = data if data is not None else build_data(cfg, models.tokenizer)
    check_data_fits(method, data)
    if tc.epochs > 0:
        resolve_steps(cfg, Fraction(len(data.train), dist.world))  # global batch B·A·N
        log(
            f"train.epochs={tc.epochs}: {tc.steps} steps over {len(data.train)} training prompts "
            f"(batch {tc.batch_size} × grad_accum {tc.grad_accum} × {dist.world} processes)"
        )
    dist.barrier()  # every process has validated before rank 0 creates anything
    if dist.is_main:
        make_run_dir(run_dir)
    if not resume and dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
    for line in source_lines(cfg, models_given, data):
        log(line)
    log(f"run folder: {run_dir}")
    log(f"method {method.name}:\n  " + method.describe().replace("\n", "\n  "))
    log(
        f"{len(data.train)} training prompts, {len(data.eval)} held-out; "
        f"{data.truncated} prompts truncated, {data.skipped} bad rows skipped"
    )
    for example in data.skipped_examples or []:
        log(f"  skipped: {example}")
    for line in data_warnings(cfg, data):
        log(f"warning: {line}")

    params = [p for p in models.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tc.warmup_steps, tc.steps, tc.min_lr_ratio)
    )
    parts = (method.prompts, method.prefixes, method.teacher, method.signal, *method.weights)
    for part in parts:  # method.teacher: [crosstok] reads the two tokenizers
        if isinstance(part, Preparable):  # e.g. G-OPD snapshots the initial student as π_ref
            part.prepare(models)
    stream = PromptStream(data.train, tc.batch_size * dist.world, seed=tc.seed)
    gen = GenerationParams(
        max_new_tokens=cfg.sampling.max_new_tokens,
        temperature=cfg.sampling.temperature,
        top_p=cfg.sampling.top_p,
        top_k=cfg.sampling.top_k,
    )
    verify = data.task.verify if data.task is not None else generic_verify
    ctx = StepContext(
        student=models.student,
        teacher=teacher_model(models.teacher),  # the local model that writes, if any
        backend=make_backend(cfg.sampling.backend),
        params=gen,
        pad_id=models.pad_id,
        stop_ids=models.stop_ids,
        tokenizer=models.tokenizer,
        verify=verify,
        total_steps=tc.steps,
        chunk_size=tc.chunk_size,
        materialize=tc.loss_path == "materialized",
        models=models,
    )
    device = next(models.student.parameters()).device
    run = Run(
        cfg,
        run_dir,
        models,
        data,
        method,
        params,
        optimizer,
        scheduler,
        stream,
        ctx,
        device,
        dist=dist,
    )
    if dist.world > 1:
        log(
            f"{dist.world} processes ({dist.kind}, {tc.batch_size} prompts each): global batch "
            f"{tc.batch_size * tc.grad_accum * dist.world} = train.batch_size × grad_accum × "
            f"{dist.world}"
        )
    resume_step = None
    if resume:
        found = load_newest(
            run.ckpt_root, models.student, optimizer, scheduler, max_step=tc.steps, warn=log
        )
        if found is None:
            log(f"no checkpoint in '{run.ckpt_root}': starting from step 0 with the saved config")
            resume_step = 0
        else:
            ckpt, state = found
            stream.load_state_dict(state["data"])
            load_component_states(method, state.get("components", {}))
            resume_queue(run, ckpt, state, log)  # async: the queue's weight versions
            run.start_step, run.losses = state["step"], list(state["losses"])
            resume_step = run.start_step
            log(f"resumed from {ckpt} at step {run.start_step}")
            world_note(state, tc, dist, log)
        if dist.is_main:
            save_config(cfg, run_dir / "config.yaml")
    dist.wrap(run, log)  # world > 1: DDP (rank 0's weights broadcast) or FSDP (opd.fsdp)
    if not dist.is_main:
        run.metrics_log = NullLog()
        return run
    trackers = open_trackers(tc.log_to, run_dir, to_dict(cfg), resume, resume_step=resume_step)
    if resume_step is not None:
        truncate_samples(run_dir, resume_step)
    run.metrics_log = MetricsLog(
        run_dir / "metrics.jsonl", resume_step=resume_step, trackers=trackers
    )
    return run


def world_note(state: dict, tc, dist: Dist, log) -> None:
    """Say so when a checkpoint written by another process count is resumed."""
    before = state.get("world_size", 1)
    if before == dist.world:
        return
    was, now = state.get("global_batch"), tc.batch_size * tc.grad_accum * dist.world
    change = "unchanged" if was == now else f"{was} -> {now} prompts"
    log(
        f"the checkpoint was written by {before} process(es), resumed by {dist.world}: "
        f"global batch {change}"
    )
