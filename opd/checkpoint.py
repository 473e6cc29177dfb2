"""Atomic checkpoints, and a resume that survives a damaged one.

A checkpoint is a folder `checkpoints/step_000042/` with
  student.safetensors   the student's weights (safetensors: no pickle)
  optimizer.pt          optimizer and scheduler state (tensors and numbers only; loaded with
                        `torch.load(weights_only=True)`, which refuses arbitrary objects)
  state.json            step, data-stream position, python RNG state, metrics so far (and,
                        from opd.train, the process count and global batch that wrote it)
  rng.safetensors       torch CPU (and CUDA) RNG states
  components.safetensors  only when a method part's state holds tensors (e.g. the EMA
                        self-teacher's weights): state.json then holds {"__tensor__": key}
  queue.safetensors     only with train.async_rollouts=k > 0: the older weight versions the
                        queued rollouts were written by (state.json "async"; opd.pipeline_state)

It is written into `checkpoints/.tmp-step_000042/` and renamed into place with `os.replace`,
so a crash mid-write never leaves a half checkpoint under a real name; `latest` (a one-line
file, also replaced atomically) names the newest. Older checkpoints beyond `keep` are removed
only after the new one is in place. A write that fails (disk full, permissions) removes its
temporary folder and raises `CheckpointError`; the older checkpoints are untouched.

Resume (`load_newest`) reads every file of the newest checkpoint into memory and checks it
(readable safetensors, JSON with the expected keys, optimizer state, the step not past
`train.steps`) before anything is restored; a damaged checkpoint is skipped with a warning
naming the file and the fault, and the previous kept one is used; none usable is an error.
`latest`, and every `step_*` folder, must resolve inside the run's `checkpoints/` folder (a
symlink or pointer to anywhere else is refused). A checkpoint of a different student
architecture is an error naming the first mismatching tensor, never a fallback.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from opd.errors import ConfigError, ModelError, OpdError

STATE_KEYS = ("step", "python_rng", "data", "losses")
FILES = ("student.safetensors", "optimizer.pt", "state.json", "rng.safetensors")


class CheckpointError(OpdError):
    """A checkpoint could not be written, or none in the run folder is usable."""


class _Damaged(Exception):
    """One checkpoint is unreadable; the message names the file and the fault."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _student_tensors(student: torch.nn.Module) -> dict:
    weights = {k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}
    # Tied weights share storage; safetensors refuses shared tensors, so clone them apart.
    seen, clean = {}, {}
    for k, v in weights.items():
        ptr = v.untyped_storage().data_ptr()
        clean[k] = v.clone() if ptr in seen else v
        seen[ptr] = k
    return clean


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    keep: int = 2,
    queue: dict | None = None,
) -> Path:
    """Write a checkpoint atomically and return its folder (CheckpointError if it fails)."""
    name = f"step_{step:06d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(_student_tensors(student), str(tmp / "student.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            tmp / "optimizer.pt",
        )
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        py = random.getstate()
        tensors: dict = {}
        state = _split_tensors(state, "", tensors)
        if tensors:
            save_file(tensors, str(tmp / COMPONENTS))
        if queue:  # the async queue's older weight versions (opd.pipeline_state)
            save_file(queue, str(tmp / QUEUE))
        full_state = dict(state, step=step, python_rng=[py[0], list(py[1]), py[2]])
        (tmp / "state.json").write_text(json.dumps(full_state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(ckpt_root / "latest", name + "\n")
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        older = [p.name for p in _step_dirs(ckpt_root) if p.name != name]
        kept = f"the older checkpoint {older[0]} is unchanged" if older else "no older checkpoint"
        raise CheckpointError(
            f"could not write checkpoint {name} in '{ckpt_root}': {err.strerror or err}; "
            f"{kept}; free space (or fix permissions) and continue with --resume "
            f"{ckpt_root.parent}"
        ) from None
    for p in _step_dirs(ckpt_root)[keep:]:
        shutil.rmtree(p, ignore_errors=True)
    return final


COMPONENTS = "components.safetensors"
QUEUE = "queue.safetensors"
_TENSOR = "__tensor__"


def _split_tensors(value, key: str, out: dict):
    """`value` with every tensor replaced by {"__tensor__": key}; the tensors go into `out`."""
    if isinstance(value, torch.Tensor):
        out[key] = value.detach().contiguous().cpu().clone()
        return {_TENSOR: key}
    if isinstance(value, dict):
        return {
            k: _split_tensors(v, f"{key}/{k}" if key else str(k), out) for k, v in value.items()
        }
    return value


def _join_tensors(value, tensors: dict):
    """The inverse of `_split_tensors`; KeyError when a named tensor is missing."""
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: _join_tensors(v, tensors) for k, v in value.items()}
    return value


def _step_dirs(ckpt_root: Path) -> list[Path]:
    """`step_*` folders, newest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.glob("step_*") if p.is_dir()), reverse=True)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def check_pointers(ckpt_root: Path) -> None:
    """Refuse a `latest` or `step_*` that resolves outside `ckpt_root` (ConfigError)."""
    marker = ckpt_root / "latest"
    if marker.is_symlink() and not _inside(marker, ckpt_root):
        raise ConfigError(
            f"'{marker}' is a link to '{os.readlink(marker)}', outside the run folder; "
            "remove it (a checkpoint pointer must name a folder under checkpoints/)"
        )
    if marker.is_file():
        try:
            target = marker.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"'{marker}' is unreadable ({err}); remove it") from None
        if target and not _inside(ckpt_root / target, ckpt_root):
            raise ConfigError(
                f"'{marker}' points to '{target}', outside the run folder; "
                "a checkpoint pointer must name a folder under checkpoints/ (e.g. step_000042)"
            )
    for p in ckpt_root.glob("step_*") if ckpt_root.is_dir() else ():
        if p.is_symlink() and not _inside(p, ckpt_root):
            raise ConfigError(
                f"checkpoint '{p}' is a link to '{os.readlink(p)}', outside the run folder; "
                "remove it"
            )


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest `step_*` folder (pointers checked), or None."""
    check_pointers(ckpt_root)
    found = _step_dirs(ckpt_root)
    return found[0] if found else None


def _read(path: Path) -> dict:
    """Every file of a checkpoint, read and checked in memory; raises _Damaged."""
    missing = [n for n in FILES if not (path / n).is_file()]
    if missing:
        raise _Damaged(f"missing {', '.join(missing)}")
    out = {}
    for name, reader in (
        ("student.safetensors", lambda p: load_file(str(p))),
        ("optimizer.pt", lambda p: torch.load(p, weights_only=True)),
        ("rng.safetensors", lambda p: load_file(str(p))),
        ("state.json", lambda p: json.loads(p.read_text())),
    ):
        try:
            out[name] = reader(path / name)
        except Exception as err:  # noqa: BLE001 - any reader failure means a damaged file
            text = " ".join(str(err).split())[:120] or type(err).__name__
            raise _Damaged(f"{name} is unreadable ({type(err).__name__}: {text})") from None
    state, opt = out["state.json"], out["optimizer.pt"]
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise _Damaged(f"state.json lacks one of the keys {', '.join(STATE_KEYS)}")
    if not isinstance(state["step"], int) or state["step"] < 0:
        raise _Damaged(f"state.json: step {state['step']!r} is not a non-negative integer")
    if not isinstance(opt, dict) or not {"optimizer", "scheduler"} <= set(opt):
        raise _Damaged("optimizer.pt lacks the optimizer or scheduler state")
    if "torch_cpu" not in out["rng.safetensors"]:
        raise _Damaged("rng.safetensors lacks the torch CPU RNG state")
    _read_queue(path, state, out)
    if (path / COMPONENTS).is_file():
        try:
            tensors = load_file(str(path / COMPONENTS))
        except Exception as err:  # noqa: BLE001 - any reader failure means a damaged file
            text = " ".join(str(err).split())[:120] or type(err).__name__
            raise _Damaged(f"{COMPONENTS} is unreadable ({type(err).__name__}: {text})") from None
    else:
        tensors = {}
    try:
        out["state.json"] = _join_tensors(state, tensors)
    except KeyError as err:
        raise _Damaged(f"{COMPONENTS} lacks the tensor {err.args[0]!r}") from None
    return out


def _read_queue(path: Path, state: dict, out: dict) -> None:
    """queue.safetensors into `out` when state.json's "async" lists weight versions."""
    info = state.get("async")
    versions = info.get("versions") if isinstance(info, dict) else None
    if not versions:
        return
    if not (path / QUEUE).is_file():
        raise _Damaged(f"missing {QUEUE} (the async queue's weight versions {versions})")
    try:
        queue = load_file(str(path / QUEUE))
    except Exception as err:  # noqa: BLE001 - any reader failure means a damaged file
        text = " ".join(str(err).split())[:120] or type(err).__name__
        raise _Damaged(f"{QUEUE} is unreadable ({type(err).__name__}: {text})") from None
    held = {key.partition("/")[0] for key in queue}
    lacking = [v for v in versions if str(v) not in held]
    if lacking:
        raise _Damaged(f"{QUEUE} lacks the weight version(s) {lacking}")
    out[QUEUE] = queue


def check_architecture(path: Path, weights: dict, student: torch.nn.Module) -> None:
    """ModelError naming the first tensor whose name or shape differs from the student's."""
    own = student.state_dict()
    extra = sorted(set(weights) - set(own))
    missing = sorted(k for k in set(own) - set(weights) if "lm_head" not in k)
    if extra or missing:
        what = f"unexpected tensor {extra[0]!r}" if extra else f"no tensor {missing[0]!r}"
        raise ModelError(
            f"checkpoint '{path}' holds a different student architecture ({what}); resume "
            "with the student the run was started with (model.student in its config.yaml)"
        )
    for k, v in weights.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ModelError(
                f"checkpoint '{path}' holds a different student architecture: {k} has shape "
                f"{tuple(v.shape)}, the student {tuple(own[k].shape)}; resume with the student "
                "the run was started with (model.student in its config.yaml)"
            )


def _apply(loaded: dict, student, optimizer, scheduler) -> dict:
    student.load_state_dict(loaded["student.safetensors"], strict=False)
    opt = loaded["optimizer.pt"]
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = loaded["rng.safetensors"]
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    state = loaded["state.json"]
    if QUEUE in loaded:
        state["queue_weights"] = loaded[QUEUE]  # opd.pipeline_state.resume_queue reads them
    v, internal, gauss = state["python_rng"]
    random.setstate((v, tuple(internal), gauss))
    return state


def load_checkpoint(path: Path, student, optimizer, scheduler) -> dict:
    """Restore one checkpoint (student, optimizer, scheduler, RNG); return its state dict."""
    try:
        loaded = _read(path)
    except _Damaged as err:
        raise CheckpointError(f"checkpoint '{path}' is unusable: {err}") from None
    check_architecture(path, loaded["student.safetensors"], student)
    return _apply(loaded, student, optimizer, scheduler)


def load_newest(ckpt_root: Path, student, optimizer, scheduler, *, max_step: int, warn=print):
    """Restore the newest usable checkpoint; (path, state), or None when there is none.

    Damaged checkpoints are skipped with a warning naming the file and the fault; a
    checkpoint past `max_step` (train.steps) or of another architecture is an error.
    """
    check_pointers(ckpt_root)
    candidates = _step_dirs(ckpt_root)
    if not candidates:
        return None
    faults = []
    for path in candidates:
        try:
            loaded = _read(path)
        except _Damaged as err:
            faults.append(f"{path.name}: {err}")
            warn(f"warning: checkpoint '{path}' is unusable ({err}); trying an older one")
            continue
        step = loaded["state.json"]["step"]
        if step > max_step:
            raise ConfigError(
                f"checkpoint '{path}' is at step {step}, past train.steps={max_step}; resume "
                f"with train.steps={step} or more"
            )
        check_architecture(path, loaded["student.safetensors"], student)
        return path, _apply(loaded, student, optimizer, scheduler)
    raise CheckpointError(
        f"no usable checkpoint in '{ckpt_root}' ({'; '.join(faults)}); start a new run "
        "(another output_dir) or restore a checkpoint"
    )
