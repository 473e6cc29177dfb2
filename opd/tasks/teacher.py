"""Tiny task teachers trained from scratch, and greedy exact-match evaluation.

`train_task_teacher` fits a small Llama with a character tokenizer (`opd.tiny`) to one
synthetic task by plain supervised next-token cross-entropy, on CPU, in minutes:

    loss = mean over completion tokens t of  -log p_θ(y_t | x, y_<t)

with the input `prompt_ids + completion_ids + [eos]` (no chat template; the prompt ends in
a newline) and the prompt and padding positions masked out of the loss. Every step draws a
fresh batch from the task generator, skipping the held-out prompts, so the model never sees
the evaluation set. AdamW with linear warm-up and a cosine decay to 10 % of the peak rate. With
`TeacherPreset.corrupt_fraction > 0` (recoverable tasks: `chain_fix`, `sort_fix`) that share of
rows carries 1..`max_errors` injected, corrected errors whose wrong values are masked out of
the loss (`opd.tasks.recovery`). For chain / sort teachers, clean or not, the info also holds
their `recovery_accuracy` (1, 2, 3 errors) on the held-out problems.

The trained teacher is saved with `save_pretrained` (safetensors) into a folder named by a
hash of every setting, written under a temporary name and `os.replace`d, so an interrupted
run never leaves a half-written cache and a second call just loads it.

`generate_completions` (left-padded batched greedy decoding with the KV cache, stopping at
eos) and `evaluate_accuracy` are shared with the benchmarks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from opd.errors import ConfigError
from opd.sampling import GenerationParams, make_backend
from opd.tasks import get_task
from opd.tasks.base import Task
from opd.tasks.recovery import (
    check_corruption,
    corrupt_rows,
    masked_labels,
    recovery_report,
    recovery_task,
)
from opd.tiny import char_tokenizer, tiny_llama

CACHE_FORMAT = 1
"""Bump to invalidate every cached teacher (part of the folder hash)."""
EVAL_SEED = 1_000_003
"""Held-out problems are drawn from `EVAL_SEED + seed`; training batches from other seeds."""


@dataclasses.dataclass(frozen=True)
class TeacherPreset:
    """Model size and optimisation settings for one task's teacher."""

    hidden: int = 128
    """Hidden size of the Llama."""
    layers: int = 4
    """Number of decoder layers."""
    heads: int = 4
    """Attention heads (head dim = hidden / heads)."""
    steps: int = 1500
    """Optimizer steps, one fresh batch each."""
    batch_size: int = 64
    """Rows per step."""
    lr: float = 3e-3
    """Peak learning rate."""
    warmup: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    corrupt_fraction: float = 0.0
    """Recoverable tasks only: fraction of training rows given injected, corrected errors
    (`opd.tasks.recovery`). 0 (clean training) leaves the cache key as it always was."""
    max_errors: int = 2
    """Errors per corrupted row are drawn from 1..max_errors."""


PRESETS: dict[str, TeacherPreset] = {
    # 128 hidden x 2 layers = 0.36 M parameters; 64 rows x ~40 tokens per step.
    # In tuning (100 held-out rows) sort reached 97 % at step 600, chain 100 % at 800,
    # brackets 98-100 % from 500, reverse 96 % at 300; the step counts leave margin.
    "sort": TeacherPreset(hidden=128, layers=2, steps=800),
    "chain": TeacherPreset(hidden=128, layers=2, steps=1000),
    "brackets": TeacherPreset(hidden=128, layers=2, steps=1000),
    "reverse": TeacherPreset(hidden=128, layers=2, steps=500),
    # Half the rows carry 1-2 corrected errors; the wrong values' loss is masked.
    "chain_fix": TeacherPreset(hidden=128, layers=2, steps=1000, corrupt_fraction=0.5),
    "sort_fix": TeacherPreset(hidden=128, layers=2, steps=800, corrupt_fraction=0.5),
}
"""Per-task settings tuned to reach >= 95 % held-out accuracy on 2 CPU cores."""


def default_cache_root() -> Path:
    """`$OPD_CACHE_DIR/task_teachers`, else `~/.cache/opd/task_teachers`."""
    base = os.environ.get("OPD_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "opd") / "task_teachers"


def encode_sft_batch(
    tokenizer, rows: list[dict[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `prompt + completion + eos` ids with the loss on the completion only.

    Args:
      tokenizer: any tokenizer with `pad_token_id` and `eos_token_id`.
      rows: dicts with `"prompt"` and `"completion"` (plain text, no chat template).

    Returns:
      `(input_ids_BT, attention_mask_BT, labels_BT)`; labels are -100 on prompt and padding.
    """
    prompt_ids = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer([r["completion"] for r in rows], add_special_tokens=False)[
        "input_ids"
    ]
    seqs = [p + c + [tokenizer.eos_token_id] for p, c in zip(prompt_ids, completion_ids)]
    B, T = len(seqs), max(len(s) for s in seqs)
    input_ids_BT = torch.full((B, T), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask_BT = torch.zeros((B, T), dtype=torch.long)
    labels_BT = torch.full((B, T), -100, dtype=torch.long)
    for i, (seq, p) in enumerate(zip(seqs, prompt_ids)):
        input_ids_BT[i, : len(seq)] = torch.tensor(seq)
        attention_mask_BT[i, : len(seq)] = 1
        labels_BT[i, len(p) : len(seq)] = torch.tensor(seq[len(p) :])
    return input_ids_BT, attention_mask_BT, labels_BT


@torch.no_grad()
def generate_completions(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64
) -> list[str]:
    """Greedy completions of plain-text prompts, batched with left padding.

    Decoding (`opd.sampling.make_backend("auto")`) uses a KV cache and stops each row at the
    tokenizer's eos; special tokens are dropped from the returned text. The model's
    train/eval mode is restored after.

    Args:
      model: a causal LM.
      tokenizer: its tokenizer (with a pad token).
      prompts: the prompt strings, already formatted (no template is applied).
      max_new_tokens: generation budget per row.
      batch_size: rows per `generate` call.

    Returns:
      One completion string per prompt, in order.
    """
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completions = make_backend("auto", batch_size).generate(
        model, ids, GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0),
        pad_id=tokenizer.pad_token_id, stop_ids=[tokenizer.eos_token_id],
    )
    return tokenizer.batch_decode(completions, skip_special_tokens=True)


def evaluate_accuracy(
    model,
    tokenizer,
    task: Task | str,
    rows: list[dict[str, str]],
    batch_size: int = 64,
    max_new_tokens: int | None = None,
) -> float:
    """Exact-match accuracy of greedy completions, checked by `task.verify`.

    Args:
      model, tokenizer: the model to score and its tokenizer.
      task: a `Task` or a registered task name.
      rows: rows with `"prompt"` and `"answer"` (prompts are used as is).
      batch_size: rows per `generate` call.
      max_new_tokens: default: the longest reference completion in tokens, plus 8.

    Returns:
      The fraction of rows whose completion verifies, in [0, 1] (0 for no rows).
    """
    task = get_task(task) if isinstance(task, str) else task
    if not rows:
        return 0.0
    if max_new_tokens is None:
        references = [r.get("completion", r["answer"]) for r in rows]
        ids = tokenizer(references, add_special_tokens=False)["input_ids"]
        max_new_tokens = max(len(x) for x in ids) + 8
    texts = generate_completions(
        model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size
    )
    return sum(task.verify(t, r["answer"]) for t, r in zip(texts, rows)) / len(rows)


def train_task_teacher(
    task_name: str,
    *,
    steps: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    knobs: dict[str, int] | None = None,
    progress: bool = True,
    preset: TeacherPreset | None = None,
    eval_rows: int = 200,
    num_threads: int | None = None,
    cached_only: bool = False,
):
    """Train (or load from the cache) a tiny teacher for a synthetic task.

    Args:
      task_name: a registered task, e.g. `"sort"`.
      steps: optimizer steps; default the preset's.
      seed: seeds the model init, the training stream and the held-out set.
      cache_dir: root of the cache; the teacher lives in `<root>/<task>-<hash>/`.
        Default `default_cache_root()`.
      knobs: task difficulty knobs (see `Task.default_knobs`).
      progress: show a progress bar with the loss.
      preset: model size and optimisation settings; default `PRESETS[task_name]`.
      eval_rows: number of held-out problems for the accuracy.
      num_threads: if given, `torch.set_num_threads(num_threads)` before training (a
        process-wide setting). On a 2-core machine shared with other jobs, 1 thread ran a
        step ~5x faster than 2 (OpenMP threads oversubscribe the cores).
      cached_only: load from the cache, never train (ConfigError naming the folder if absent).

    Returns:
      `(model, tokenizer, info)`: the model in eval mode, its character tokenizer, and a
      dict with the settings, `params`, `train_seconds`, `accuracy`, `cached` and `path`.
    """
    task = get_task(task_name)
    preset = preset or PRESETS.get(task_name)
    if preset is None:
        raise ConfigError(
            f"no teacher preset for task {task_name!r}; pass preset= or use one of: "
            f"{', '.join(sorted(PRESETS))}"
        )
    if steps is not None:
        preset = dataclasses.replace(preset, steps=steps)
    if preset.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {preset.steps}")
    if preset.corrupt_fraction:
        check_corruption(task, preset.corrupt_fraction, preset.max_errors)
    fields = dataclasses.asdict(preset)
    if not preset.corrupt_fraction:  # clean training: the cache key of every older teacher
        del fields["corrupt_fraction"], fields["max_errors"]
    settings = {
        "format": CACHE_FORMAT,
        "task": task_name,
        "knobs": task.resolve_knobs(knobs),
        "seed": seed,
        "eval_rows": eval_rows,
        **fields,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    path = root / f"{task_name}-{digest}"
    if (path / "info.json").is_file():
        return _load_cached(path, progress)
    if cached_only:
        raise ConfigError(
            f"no cached {task_name} teacher at '{path}' for these settings (cached_only: a "
            "different preset, steps, knobs, seed or cache folder than the one it was trained with)"
        )

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    model, tokenizer, info = _train(task, settings, preset, progress)
    info["path"] = str(path)
    _save_atomic(model, tokenizer, info, root, path, progress)
    return model, tokenizer, {**info, "cached": False}


def _train(task: Task, settings: dict, preset: TeacherPreset, progress: bool):
    """The training loop proper; returns `(model, tokenizer, info)` without saving."""
    seed, knobs = settings["seed"], settings["knobs"]
    tokenizer = char_tokenizer()
    model = tiny_llama(
        len(tokenizer),
        hidden=preset.hidden,
        layers=preset.layers,
        heads=preset.heads,
        max_positions=256,
        seed=seed,
    )
    held_out = task.generate(settings["eval_rows"], EVAL_SEED + seed, **knobs)
    held_out_prompts = {r["prompt"] for r in held_out}

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=preset.lr, betas=(0.9, 0.98), weight_decay=preset.weight_decay
    )

    # Not `opd.train.lr_lambda`, whose semantics differ: its warm-up is (step+1)/(warmup+1),
    # reaching the peak one step later (at step `warmup`, here at `warmup`−1), and no shift of
    # its arguments reproduces this schedule after the warm-up. Every cached teacher and the
    # PRESETS' tuned accuracies come from this schedule; changing it would retrain them all.
    def lr_factor(step: int) -> float:
        if step < preset.warmup:
            return (step + 1) / preset.warmup
        progress_frac = (step - preset.warmup) / max(1, preset.steps - preset.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    bar = None
    if progress:
        bar = tqdm(total=preset.steps, desc=f"teacher {task.name}", leave=False)
    model.train()
    start = time.perf_counter()
    for step in range(preset.steps):
        # Seeds 0..EVAL_SEED-1 per run: a fresh batch each step, never the held-out stream.
        batch_seed = (seed * 7919 + step) % EVAL_SEED
        rows = [
            r
            for r in task.generate(preset.batch_size, batch_seed, **knobs)
            if r["prompt"] not in held_out_prompts
        ]
        if preset.corrupt_fraction:
            rows = corrupt_rows(task, rows, random.Random(batch_seed + EVAL_SEED),
                                preset.corrupt_fraction, preset.max_errors)  # fmt: skip
        input_ids_BT, attention_mask_BT, labels_BT = encode_sft_batch(tokenizer, rows)
        if preset.corrupt_fraction:
            labels_BT = masked_labels(tokenizer, rows, labels_BT, _prompt_lengths(tokenizer, rows))
        loss = model(
            input_ids=input_ids_BT, attention_mask=attention_mask_BT, labels=labels_BT
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    train_seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    model.eval()
    accuracy = evaluate_accuracy(model, tokenizer, task, held_out)
    info = {
        **settings,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 2),
        "final_loss": round(loss.item(), 5),
        "accuracy": accuracy,
    }
    if recovery_task(task.name) is not None:
        info["recovery_accuracy"] = recovery_report(model, tokenizer, task.name, held_out)
    return model, tokenizer, info


def _prompt_lengths(tokenizer, rows: list[dict]) -> list[int]:
    ids = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    return [len(x) for x in ids]


def _save_atomic(
    model, tokenizer, info: dict, root: Path, path: Path, progress: bool = True
) -> None:
    """Write into a temporary folder beside `path`, then rename it into place."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=root))
    bars_were_on = hf_logging.is_progress_bar_enabled()
    try:
        if not progress:
            hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        # Another process finished the same teacher first: keep theirs.
        if not (path / "info.json").is_file():
            raise
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(path: Path, progress: bool = True):
    """Load a cached teacher folder as `(model, tokenizer, info)`."""
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()  # from_pretrained's "Loading weights" bar
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    info = json.loads((path / "info.json").read_text())
    return model, tokenizer, {**info, "cached": True, "path": str(path)}
