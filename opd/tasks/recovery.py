"""Teachers that recover: training on corrupted prefixes, and recovery accuracy.

Training rows (`corrupt_rows`). A fraction `f` of a batch's rows is rewritten by
`opd.tasks.recoverable.inject_errors` with k ~ Uniform{1..m} errors, each followed by its
correction marker and the correct continuation. The loss of such a row is the usual
completion cross-entropy EXCEPT on the tokens of the injected wrong values:

    loss = mean over completion tokens t not in W of  -log p_θ(y_t | x, y_<t)

with W the tokens overlapping a wrong value's characters (`masked_labels`). The teacher
therefore never learns to write an error, only what follows one: the marker, the right value
and the rest of the answer. m should be about as many errors as a warm-started student makes
(a knob, `TeacherPreset.max_errors`); states with more errors than m are never seen in
training, which `recovery_accuracy` at larger `n_errors` measures.

Recovery accuracy (`recovery_accuracy`). For each held-out row, a corrupted prefix is drawn
with `inject_errors(..., prefix_only=True)`: `n_errors` wrong values, the first `n_errors - 1`
corrected, the text cut right after the last (uncorrected) one. The model continues greedily
from `prompt + prefix`; the row counts as recovered when `prefix + continuation` verifies
with the recoverable task's verifier (corrections applied). The prefixes depend only on the
rows, `n_errors` and `seed`, so every model is scored on the same prefixes. A clean-trained
teacher of the base task (`chain`, `sort`: same prompts) is scored the same way; it can only
recover by writing the marker it never saw, so its score measures the premise's absence.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch

from opd.errors import ConfigError
from opd.tasks import TASKS, get_task
from opd.tasks.recoverable import RecoverableTask, inject_errors

RECOVERY_ERRORS = (1, 2, 3)
"""The `n_errors` of a teacher's recovery report."""


def recoverable(task) -> RecoverableTask:
    """`task` (a name or a `Task`) if it has correction markers, else a `ConfigError`."""
    task = get_task(task) if isinstance(task, str) else task
    if not isinstance(task, RecoverableTask):
        names = ", ".join(n for n, t in TASKS.items() if isinstance(t, RecoverableTask))
        raise ConfigError(f"task {task.name!r} has no correction marker; recoverable: {names}")
    return task


def recovery_task(name: str) -> RecoverableTask | None:
    """The recoverable task whose verifier scores a model of task `name`: itself if it has
    markers, its variant for a base task (`chain` -> `chain_fix`: same prompts), else None."""
    for task in TASKS.values():
        if isinstance(task, RecoverableTask) and name in (task.name, task.base_name):
            return task
    return None


def check_corruption(task, fraction: float, max_errors: int) -> None:
    """`ConfigError` unless `task` is recoverable, 0 < fraction <= 1 and max_errors >= 1."""
    recoverable(task)
    if not 0 < fraction <= 1:
        raise ConfigError(f"corrupt_fraction must be in (0, 1], got {fraction}")
    if isinstance(max_errors, bool) or not isinstance(max_errors, int) or max_errors < 1:
        raise ConfigError(f"max_errors must be an integer >= 1, got {max_errors!r}")


def corrupt_rows(
    task: RecoverableTask,
    rows: list[dict[str, str]],
    rng: random.Random,
    fraction: float,
    max_errors: int,
) -> list[dict]:
    """A copy of `rows` where each row, with probability `fraction`, carries 1..`max_errors`
    corrected errors; a corrupted row has `"masked"`: the wrong values' character spans in its
    completion (see `masked_labels`). Clean rows are returned unchanged."""
    out = []
    for row in rows:
        if rng.random() < fraction:
            bad = inject_errors(task, row, rng, rng.randint(1, max_errors))
            out.append({**row, "completion": bad.text, "masked": bad.spans})
        else:
            out.append(row)
    return out


def masked_labels(
    tokenizer, rows: list[dict], labels_BT: torch.Tensor, prompt_lengths: list[int]
) -> torch.Tensor:
    """`labels_BT` with -100 on every completion token that overlaps a `"masked"` span.

    Args:
      tokenizer: a fast tokenizer (character offsets are read with `return_offsets_mapping`).
      rows: the batch's rows; those without `"masked"` are left as they are.
      labels_BT: labels of `encode_sft_batch` (prompt + completion + eos, right padded).
      prompt_lengths: each row's prompt length in tokens (where its completion starts).

    Returns:
      A new tensor; the input is not modified.
    """
    labels_BT = labels_BT.clone()
    for i, row in enumerate(rows):
        spans = row.get("masked") or []
        if not spans:
            continue
        enc = tokenizer(row["completion"], add_special_tokens=False, return_offsets_mapping=True)
        for t, (a, b) in enumerate(enc["offset_mapping"]):
            if any(a < end and start < b for start, end in spans):
                labels_BT[i, prompt_lengths[i] + t] = -100
    return labels_BT


def corrupted_prefixes(
    task: RecoverableTask, rows: list[dict[str, str]], n_errors: int, seed: int = 0
) -> list[str]:
    """One corrupted prefix per row (see the module docstring), deterministic in `seed`."""
    return [
        inject_errors(
            task, row, random.Random(seed * 1_000_003 + i), n_errors, prefix_only=True
        ).text
        for i, row in enumerate(rows)
    ]


def recovery_accuracy(
    model,
    tokenizer,
    task,
    rows: list[dict[str, str]],
    n_errors: int = 1,
    *,
    seed: int = 0,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
) -> float:
    """Fraction of rows whose answer is right when the model continues a corrupted prefix.

    Args:
      model: a causal LM (greedy decoding, `opd.tasks.teacher.generate_completions`), or a
        callable `list of prompt strings -> list of continuations` (a stand-in, or any other
        text generator).
      tokenizer: the model's tokenizer (unused by a callable).
      task: a recoverable task or its name (`chain_fix`, `sort_fix`): its verifier applies
        the corrections.
      rows: held-out rows (`"prompt"`, `"completion"`, `"answer"`).
      n_errors: wrong values in each prefix (the last one uncorrected, at the prefix's end).
      seed: seeds the prefixes.
      max_new_tokens: default: the longest reference completion in tokens, plus 8 per error.

    Returns:
      A fraction in [0, 1] (0 for no rows).
    """
    task = recoverable(task)
    if not rows:
        return 0.0
    prefixes = corrupted_prefixes(task, rows, n_errors, seed)
    prompts = [r["prompt"] + p for r, p in zip(rows, prefixes)]
    complete: Callable[[list[str]], list[str]]
    if isinstance(model, torch.nn.Module) or not callable(model):
        from opd.tasks.teacher import generate_completions

        if max_new_tokens is None:
            ids = tokenizer([r["completion"] for r in rows], add_special_tokens=False)
            max_new_tokens = max(len(x) for x in ids["input_ids"]) + 8 * n_errors

        def complete(texts: list[str]) -> list[str]:
            return generate_completions(model, tokenizer, texts, max_new_tokens, batch_size)
    else:
        complete = model
    texts = complete(prompts)
    recovered = [task.verify(p + t, r["answer"]) for p, t, r in zip(prefixes, texts, rows)]
    return sum(recovered) / len(rows)


def recovery_report(
    model,
    tokenizer,
    task_name: str,
    rows: list[dict[str, str]],
    n_errors: tuple[int, ...] = RECOVERY_ERRORS,
    seed: int = 0,
) -> dict[str, float]:
    """`{"1": acc, "2": acc, ...}`: `recovery_accuracy` for each `n_errors`, scored with
    `recovery_task(task_name)`'s verifier (a clean `chain` teacher with `chain_fix`'s)."""
    task = recovery_task(task_name)
    if task is None:
        raise ConfigError(f"task {task_name!r} has no recoverable variant")
    return {str(k): recovery_accuracy(model, tokenizer, task, rows, k, seed=seed) for k in n_errors}


def teacher_recovery(model, tokenizer, task_name: str, rows_file) -> dict:
    """`{"recovery_accuracy": recovery_report(...)}` on the rows of a JSONL file (the quality
    benchmark's held-out set) for a task with a recoverable variant, else `{}`."""
    if recovery_task(task_name) is None:
        return {}
    rows = [json.loads(line) for line in Path(rows_file).read_text().splitlines()]
    return {"recovery_accuracy": recovery_report(model, tokenizer, task_name, rows)}
