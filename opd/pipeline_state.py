"""The asynchronous pipeline's side of a run's setup and checkpoints (`opd.pipeline`).

`check_async`: the methods a background producer cannot serve (ConfigError, at setup).

Exact resume: the queue's weight versions in each checkpoint, and (`sampling.backend=vllm`
with `vllm_sync_every` > 1) the weights the vLLM engine still holds: state.json
"vllm_engine" = {"pushed_step": p, "weights": tensors in components.safetensors} when step D
would not push again (opd.sampling.backends.vllm, "resume").

With `train.async_rollouts=k` item j is written by θ_{v(j)}, v(j) = max(j − k, r), r the step
at which the queue was last filled from the live weights (`opd.pipeline`). When the
checkpoint of D finished steps is written, items D .. D+k−1 are queued (or about to be), and
were written by θ_{v(D)} .. θ_{v(D+k−1)}: older weights than the checkpoint's θ_D. So the
checkpoint also holds

    queue.safetensors   the distinct versions v < D among them (at most k), each the
                        student's trainable tensors, keys "<version>/<tensor name>"
    state.json "async"  {"rollouts": k, "start": r, "versions": [...]}

written into the same temporary folder as the rest and renamed with it (atomic), and checked
on resume like every other file (`opd.checkpoint`: a missing or unreadable queue.safetensors
makes the checkpoint damaged, and an older one is used). A checkpoint grows by up to k
copies of the trainable weights (a LoRA student: the adapters only); the run holds the same
k copies in CPU memory (one per step, taken by the producer thread).

`--resume` with the same k hands them to the pipeline, which refills the queue with exactly
those versions, in order, from the checkpoint's data position and RNG states: the resumed
run's losses and weights equal the uninterrupted run's bit for bit.

Another k on resume:
    checkpoint k ≥ 1, resumed with k = 0    allowed: the synchronous loop from θ_D (the
                                            queued items are dropped; said in the log)
    checkpoint k = 0 (or written before      allowed: the queue is filled from θ_D as at a
    queues were saved), resumed with k ≥ 1  run's start (lags 0 .. k−1; said in the log)
    checkpoint k ≥ 1, resumed with k' ≥ 1,  ConfigError naming train.async_rollouts and the
    k' ≠ k                                  checkpoint's k: no uninterrupted run to equal
"""

from __future__ import annotations

from pathlib import Path

from opd.checkpoint import QUEUE, CheckpointError
from opd.errors import ConfigError
from opd.parts import Stateful
from opd.teachers.base import teacher_model


def check_async(method, models) -> None:
    """ConfigError when the method cannot run with a background producer (module doc)."""
    pre = "train.async_rollouts > 0"
    if teacher_model(models.teacher) is models.student:
        raise ConfigError(f"{pre}: the teacher is the student (model.teacher=self); use 0")
    parts = {"prompts": method.prompts, "prefixes": method.prefixes, "teacher": method.teacher}
    parts.update(
        {"signal": method.signal}, **{f"weight {i}": w for i, w in enumerate(method.weights)}
    )
    for name, part in parts.items():
        if callable(getattr(part, "after_optimizer_step", None)):
            raise ConfigError(
                f"{pre}: recipe {method.name!r}'s {name} ({type(part).__name__}) follows the "
                "student after each optimizer step; it cannot score from a background thread; "
                "use train.async_rollouts=0"
            )
    for name in ("prompts", "prefixes", "teacher"):
        if isinstance(parts[name], Stateful):
            raise ConfigError(
                f"{pre}: recipe {method.name!r}'s {name} ({type(parts[name]).__name__}) keeps "
                "state across steps, which the background producer would share with training; "
                "use train.async_rollouts=0"
            )


def queue_state(run, done: int) -> tuple[dict, dict]:
    """For the checkpoint of `done` steps: state.json's "async" entry and the tensors of
    queue.safetensors ({} when the queue needs no weights older than the checkpoint's), and
    "vllm_engine" when a vLLM engine holds older weights that step `done` keeps using."""
    held = getattr(run.ctx.backend, "engine_state", None)
    engine = held(done, run.cfg.sampling.vllm_sync_every) if held is not None else None
    entries, tensors = _queue_state(run, done)
    return (entries if engine is None else {**entries, "vllm_engine": engine}), tensors


def resume_engine(run, state: dict) -> None:
    """After --resume: a vLLM engine's older weights from the checkpoint (`queue_state`)."""
    engine = state.get("vllm_engine")
    restore = getattr(run.ctx.backend, "restore_engine", None)
    if engine is not None and restore is not None:
        restore(engine)


def _queue_state(run, done: int) -> tuple[dict, dict]:
    k = run.cfg.train.async_rollouts
    if k == 0:
        return {"async": {"rollouts": 0}}, {}
    pipe = getattr(run, "pipeline", None)
    start = done if pipe is None or pipe.start is None else pipe.start
    versions = sorted({max(j - k, start) for j in range(done, done + k)} - {done})
    if any(v not in pipe.snapshots for v in versions):  # a failed copy: refill from θ_done
        start, versions = done, []
    tensors = {
        f"{v}/{name}": t.contiguous() for v in versions for name, t in pipe.snapshots[v].items()
    }
    return {"async": {"rollouts": k, "start": start, "versions": versions}}, tensors


def resume_queue(run, path: Path, state: dict, log) -> None:
    """After `path` is restored: give the pipeline the queue's weight versions (same k), or
    say what a changed `train.async_rollouts` does (module doc); ConfigError when refused.
    A vLLM engine's older weights, if the checkpoint holds them, go to the backend."""
    resume_engine(run, state)
    k, step = run.cfg.train.async_rollouts, state["step"]
    info = state.get("async")
    was = info.get("rollouts", 0) if isinstance(info, dict) else None
    if k == 0:
        if was:
            log(
                f"the checkpoint was written with train.async_rollouts={was}; resumed with 0: "
                f"its queued items are dropped and step {step + 1} on is synchronous"
            )
        return
    if not was:
        why = "a synchronous run's" if was == 0 else "written before queues were saved"
        log(
            f"train.async_rollouts={k}: the checkpoint ({why}) holds no queue; items "
            f"{step + 1} .. {step + k} are written by its weights, as at a run's start"
        )
        return
    if was != k:
        raise ConfigError(
            f"train.async_rollouts={k}, but checkpoint '{path}' was written with "
            f"train.async_rollouts={was} and holds the weights of its {was} queued item(s); "
            f"resume with train.async_rollouts={was} (exact) or 0 (synchronous from there)"
        )
    own = run.models.student.state_dict()
    saved: dict[int, dict] = {}
    for key, tensor in state.get("queue_weights", {}).items():
        version, _, name = key.partition("/")
        if name not in own or tuple(own[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint '{path}': {QUEUE} holds {key!r}, which is not a tensor of this "
                "student (or has another shape); resume with the student the run started with"
            )
        saved.setdefault(int(version), {})[name] = tensor
    student = run.models.student
    mine = {id(p) for p in student.parameters() if p.requires_grad}
    trainable = {n for n, v in student.state_dict(keep_vars=True).items() if id(v) in mine}
    for version in info.get("versions", []):
        lacking = sorted(trainable - set(saved.get(int(version), {})))
        if lacking:
            raise CheckpointError(
                f"checkpoint '{path}': {QUEUE} lacks {lacking[0]!r} of weight version "
                f"{version}; resume with train.async_rollouts=0, or from an older checkpoint"
            )
    run.queue_resume = (int(info["start"]), saved)
