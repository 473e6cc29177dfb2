"""Atomic checkpoints and resume.

A checkpoint is a folder `checkpoints/step_000042/` with
  student.safetensors   the student's weights (safetensors: no pickle)
  optimizer.pt          optimizer and scheduler state (tensors and numbers only; loaded with
                        `torch.load(weights_only=True)`, which refuses arbitrary objects)
  state.json            step, data-stream position, python RNG state, metrics so far
  rng.safetensors       torch CPU (and CUDA) RNG states

It is written into `checkpoints/.tmp-step_000042/` and renamed into place with `os.replace`,
so a crash mid-write never leaves a half checkpoint under a real name; `latest` (a one-line
file, also replaced atomically) names the newest. Older checkpoints beyond `keep` are removed
only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from opd.errors import ConfigError


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically and return its folder."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}
    # Tied weights share storage; safetensors refuses shared tensors, so clone them apart.
    seen, clean = {}, {}
    for k, v in weights.items():
        ptr = v.untyped_storage().data_ptr()
        clean[k] = v.clone() if ptr in seen else v
        seen[ptr] = k
    save_file(clean, str(tmp / "student.safetensors"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        tmp / "optimizer.pt",
    )
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    py_state = random.getstate()
    full_state = dict(state, step=step, python_rng=[py_state[0], list(py_state[1]), py_state[2]])
    (tmp / "state.json").write_text(json.dumps(full_state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(ckpt_root / "latest", name + "\n")
    old = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    marker = ckpt_root / "latest"
    if marker.is_file():
        p = ckpt_root / marker.read_text().strip()
        if p.is_dir():
            return p
    found = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    return found[-1] if found else None


def load_checkpoint(path: Path, student, optimizer, scheduler) -> dict:
    """Restore student, optimizer, scheduler and RNG states; return the saved state dict."""
    needed = ["student.safetensors", "optimizer.pt", "state.json", "rng.safetensors"]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise ConfigError(f"checkpoint '{path}' is incomplete: missing {', '.join(missing)}")
    weights = load_file(str(path / "student.safetensors"))
    result = student.load_state_dict(weights, strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if "lm_head" not in k]:
        raise ConfigError(
            f"checkpoint '{path}' does not match the student: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    state = json.loads((path / "state.json").read_text())
    v, internal, gauss = state["python_rng"]
    random.setstate((v, tuple(internal), gauss))
    return state
