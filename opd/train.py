"""The training loop, read top to bottom: set up the run, step, evaluate and checkpoint.

    run = setup_run(...)                      validate, create the folder, restore (run_setup)
    evaluate at step 0 (new runs)
    for step in start .. last:
        row = train_step(run, step)           one optimizer step (opd.step)
        evaluate every `train.eval_every`; the final evaluation at step `train.steps`
        checkpoint every `train.checkpoint_every` steps or `train.checkpoint_minutes`,
        at the last step, and when SIGINT/SIGTERM asked the run to stop
    save the student (finite parameters only)

Only completion rows reach an lm_head. Logged per step: loss, KL(q_student ‖ p_teacher) on
the rollout, completion length, tokens/s, grad norm, lr. The loop never branches on the
method's name.

Resume: a checkpoint restores the student, optimizer, scheduler, RNG states and the data
stream position, so a resumed run reproduces the uninterrupted one step for step. The final
evaluation is written before the final checkpoint, so a run resumed after it neither repeats
nor loses that row; `--resume` on a finished run (final checkpoint and `student/` present)
says "already finished" and changes nothing.

Interruption: the first SIGINT/SIGTERM lets the current step finish, writes a checkpoint and
raises `RunInterrupted` (exit code 130 / 143 in the CLI) with the command that resumes; a
second one abandons the step at once (the last checkpoint stays).

Non-finite numbers stop the run with `NonFiniteError` naming the step (opd.step); no
checkpoint or student with non-finite parameters is ever written.

Data-parallel (`torchrun` / `accelerate launch`, `opd.distributed`): every process runs this
loop on its shard; rank 0 alone logs, evaluates, writes samples, checkpoints and the student
(the others skip those and meet it at the next step's collectives); a stop request is agreed
on by all processes; all meet at a barrier before returning. Fully sharded
(`train.fsdp=true`, opd.fsdp): the same, with the optimizer state gathered by every process
for rank 0's checkpoint; rollouts, evaluation and saving read the unsharded inference copy.
"""

from __future__ import annotations

import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from opd.build import Models, PromptSets
from opd.checkpoint import save_checkpoint
from opd.config import RunConfig, resolve_output_dir
from opd.diagnostics import EvalDiagnostics
from opd.distributed import Dist
from opd.errors import TeacherUnreachable
from opd.evaluate import heldout_kl
from opd.fsdp import check_fsdp
from opd.logs import Progress
from opd.method import Method
from opd.pipeline_state import queue_state
from opd.run_setup import (
    Run,
    build_method,
    component_states,
    lr_lambda,
    setup_run,
)
from opd.samples import sample_due, write_samples
from opd.step import (
    REVERSE_KL,
    NonFiniteError,
    micro_step,
    one_pass_loss,
    parameters_finite,
    rollout_kl,
    student_rows,
    train_step,
)
from opd.stopping import RunInterrupted, StopRequests, rewind, rewind_point

__all__ = [
    "REVERSE_KL",
    "NonFiniteError",
    "RunInterrupted",
    "RunResult",
    "build_method",
    "distill",
    "lr_lambda",
    "micro_step",
    "one_pass_loss",
    "rollout_kl",
    "save_student",
    "student_rows",
]


@dataclass
class RunResult:
    run_dir: Path
    losses: list  # per optimizer step
    metrics: list  # the rows written to metrics.jsonl this session
    models: Models
    data: PromptSets
    method: Method
    already_finished: bool = False  # --resume on a finished run: nothing was done
    is_main: bool = True  # False on a data-parallel process other than rank 0 (no report)


_clock = time.monotonic  # the checkpoint_minutes clock (tests replace it)


def run_eval(run: Run, step: int) -> dict | None:
    """Held-out KL(q_student ‖ p_teacher) and accuracy at `step`, logged as an eval row."""
    if not run.data.eval:
        return None
    m, tc = run.models, run.cfg.train
    if getattr(m, "teacher_tokenizer", None) is not None:  # [crosstok] no shared vocabulary
        from opd.crosstok.evaluate import eval_row

        run.metrics_log.write(eval_row(run, step))  # teacher NLL per byte, heldout_kl null
        return None
    diag = EvalDiagnostics.for_run(run)  # exposure gap, ECE, ... (opd.diagnostics; never raises)
    res = heldout_kl(
        m.student,
        m.teacher,
        run.data.eval,
        pad_id=m.pad_id,
        stop_ids=m.stop_ids,
        vocab_size=m.vocab_size,
        max_new_tokens=run.cfg.sampling.max_new_tokens,
        chunk_size=tc.chunk_size,
        tokenizer=m.tokenizer,
        verify=run.verify,
        on_batch=diag.own_batch,
    )
    row = {
        "event": "eval",
        "step": step,
        "heldout_kl": res["kl"],
        "heldout_accuracy": res["accuracy"],
        "heldout_length": res["mean_length"],
    }
    if res["teacher_nll"] is not None:  # a served teacher: no full distribution
        row["heldout_teacher_nll"] = res["teacher_nll"]
    row.update(diag.finish(res["completions"]))
    run.metrics_log.write(row)
    return row


def _eval_line(row: dict, when: str) -> str:
    if row.get("heldout_kl") is None and row.get("heldout_teacher_nll") is not None:
        nll = row["heldout_teacher_nll"]
        return f"held-out teacher NLL of the student's greedy tokens {when}: {nll:.4f}"
    if row.get("heldout_kl") is None:  # [black-box] a text-only teacher: accuracy only
        acc = row.get("heldout_accuracy")
        return f"held-out accuracy {when}: {'n/a' if acc is None else f'{acc:.3f}'}"
    return f"held-out KL(q_student ‖ p_teacher) {when}: {row['heldout_kl']:.4f}"


def _check_finite_student(run: Run, what: str) -> None:
    bad = parameters_finite(run.models.student)
    if bad is not None:
        raise NonFiniteError(
            f"refusing to save {what}: the student's parameter {bad} is not finite; the last "
            f"checkpoint in '{run.ckpt_root}' is kept"
        )


def checkpoint(run: Run, done: int) -> None:
    """Rank 0 writes the checkpoint of `done` steps (every rank holds the same state; under
    FSDP every rank first joins in gathering the optimizer state)."""
    optimizer = run.dist.saved_optimizer(run.optimizer)
    if not run.dist.is_main:
        return
    _check_finite_student(run, f"the checkpoint of step {done}")
    tc = run.cfg.train
    queue, queue_weights = queue_state(run, done)  # async: the queue's older weight versions
    state = {
        **queue,
        "data": run.stream.state_dict(),  # a position in the global stream
        "losses": run.losses,
        "components": component_states(run.method),
        "world_size": run.dist.world,
        "global_batch": tc.batch_size * tc.grad_accum * run.dist.world,
    }
    save_checkpoint(
        run.ckpt_root,
        done,
        run.models.student,
        optimizer,
        run.scheduler,
        state,
        keep=run.cfg.train.keep_checkpoints,
        queue=queue_weights,
    )


def distill(
    cfg: RunConfig,
    *,
    models: Models | None = None,
    method: Method | None = None,
    data: PromptSets | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    evaluate: bool = True,
    log=print,
) -> RunResult:
    """Run (or resume) a distillation described by `cfg`; returns the run's results.

    Args:
      cfg: the run configuration.
      models: pre-built models (`vocab_size` 0 is computed); default: built from `cfg.model`.
      method: a `Method` object; default: `cfg.method.recipe` with `cfg.method.args`.
      data: pre-built prompt sets; default: built from `cfg.data`.
      resume: continue from the last usable checkpoint in `cfg.output_dir` (step 0 with the
        saved config when it has none).
      stop_after: stop (with a checkpoint) after this global step, as if interrupted.
      evaluate: measure held-out KL at the start and end (and every `train.eval_every`).
      log: where one-line status messages go.

    Raises:
      OpdError (ConfigError, ModelError, DataError, CheckpointError, NonFiniteError) for
      anything the user can fix; RunInterrupted after SIGINT/SIGTERM (checkpoint written).
    """
    tc = cfg.train
    if tc.threads:
        import torch

        torch.set_num_threads(tc.threads)
    check_fsdp(cfg)  # train.fsdp: unsupported settings refused before anything is created
    dist = Dist.from_env(tc.fsdp)  # torchrun / accelerate: the process group; else one process
    try:
        return _distill(cfg, dist, models, method, data, resume, stop_after, evaluate, log)
    finally:
        dist.close()


def _distill(cfg, dist, models, method, data, resume, stop_after, evaluate, log) -> RunResult:
    log = log if dist.is_main else _silent
    named = bool(cfg.output_dir)
    # a made-up name is claimed by creating the folder (rank 0), then told to the others
    run_dir = dist.broadcast(resolve_output_dir(cfg) if dist.is_main else None)
    cfg.output_dir = str(run_dir)
    try:
        run = setup_run(
            cfg,
            run_dir,
            models=models,
            method=method,
            data=data,
            resume=resume,
            log=log,
            dist=dist,
        )
    except BaseException:
        if dist.is_main and not named and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a failed start leaves no empty folder behind
        raise
    try:
        result = _train(run, stop_after, evaluate, log)
        dist.barrier()  # rank 0 has saved the student (or failed: then this never returns)
        result.is_main = dist.is_main
        return result
    finally:
        run.metrics_log.close()


def _silent(*args, **kwargs) -> None:
    """The log of a process other than rank 0."""


def _train(run: Run, stop_after, evaluate, log) -> RunResult:
    tc, models = run.cfg.train, run.models
    student_dir = run.run_dir / "student"
    result = RunResult(run.run_dir, run.losses, [], models, run.data, run.method)
    if run.start_step == tc.steps and student_dir.is_dir():
        log(f"run '{run.run_dir}' already finished ({tc.steps} steps); nothing to do")
        result.already_finished = True
        return result
    evaluate = evaluate and run.dist.is_main  # evaluation and samples: rank 0 only
    if run.start_step == 0 and evaluate:
        first = run_eval(run, 0)
        if first:
            log(_eval_line(first, "before"))
    last_step = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = Progress(tc.steps, initial=run.start_step, enabled=tc.progress and run.dist.is_main)
    models.student.train()
    last_save = _clock()
    with StopRequests() as stop:
        for step in range(run.start_step, last_step):
            row = _step_or_checkpoint(run, step, bar)
            run.losses.append(row["loss"])
            run.metrics_log.write(row)
            result.metrics.append(row)
            bar.update(row["loss"], row["tokens_per_s"], row["teacher_kl"])
            done = step + 1
            if evaluate and tc.eval_every and done % tc.eval_every == 0 and done < tc.steps:
                run_eval(run, done)
            if evaluate and done == tc.steps:  # before the final checkpoint: never repeated
                final = run_eval(run, done)
                if final:
                    log(_eval_line(final, "after"))
            if sample_due(done, tc.sample_every) and run.data.eval and run.dist.is_main:
                write_samples(
                    run.run_dir,
                    done,
                    models,
                    run.data.eval,
                    max_new_tokens=run.cfg.sampling.max_new_tokens,
                    count=tc.sample_count,
                    trackers=run.metrics_log.trackers,
                    verify=run.verify,
                    backend=run.cfg.sampling.backend,
                )
            minutes = (_clock() - last_save) / 60
            stopping = run.dist.any(stop.signum is not None)  # every process stops together
            if (
                (tc.checkpoint_every and done % tc.checkpoint_every == 0)
                or (tc.checkpoint_minutes and minutes >= tc.checkpoint_minutes)
                or done == last_step
                or stopping
            ):
                checkpoint(run, done)
                last_save = _clock()
            if stopping and done < last_step:
                bar.close()
                name = signal.Signals(stop.signum or signal.SIGTERM).name
                raise RunInterrupted(
                    f"{name}: stopped after step {done} (checkpoint written); continue with "
                    f"opd distill --resume {run.run_dir}",
                    128 + stop.signum,
                )
    bar.close()
    if last_step == tc.steps and run.dist.is_main:
        _check_finite_student(run, "the student")
        save_student(models, student_dir)
        log(f"student saved to {student_dir}")
    elif stop_after is not None:
        log(
            f"stopped after step {last_step} (checkpoint written); continue with "
            f"opd distill --resume {run.run_dir}"
        )
    return result


def _step_or_checkpoint(run: Run, step: int, bar) -> dict:
    """`train_step`; when the served teacher stays unreachable, rewind the step's random
    state and data position, write a checkpoint of the `step` finished steps and stop with
    one line (exit code 2) saying how to continue. The student was not updated."""
    before = rewind_point(run)
    try:
        return train_step(run, step)
    except TeacherUnreachable as err:
        bar.close()
        rewind(run, before)
        checkpoint(run, step)
        raise TeacherUnreachable(
            f"{err}; stopped at step {step + 1} with a checkpoint of step {step}: when the "
            f"teacher answers again, continue with opd distill --resume {run.run_dir} (add "
            "model.teacher=URL if it moved)"
        ) from None


def save_student(models: Models, path: Path) -> None:
    """`save_pretrained` (safetensors) + tokenizer, loadable with AutoModelForCausalLM; a LoRA
    student is saved merged there and as an adapter in `student/adapter` (opd.models.lora)."""
    from opd.checkpoint import CheckpointError
    from opd.models.lora import is_lora, save_lora_student

    tmp = path.with_name(f".tmp-{path.name}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        if is_lora(models.student):
            save_lora_student(models.student, models.tokenizer, tmp)
        else:
            models.student.save_pretrained(tmp)  # safetensors by default
            models.tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not save the student to '{path}': {err.strerror or err}; the final "
            f"checkpoint is kept: free space and run opd distill --resume {path.parent}"
        ) from None
