"""Sample completions: a few held-out prompts with the student's and the teacher's greedy
completions, every `train.sample_every` optimizer steps (0 = off, the default).

Each sample point appends `count` rows to RUN/samples.jsonl and sends them to the trackers
(`Trackers.log_samples`):

    {"step": 20, "prompt": "3+4=", "student": "7", "teacher": "7",
     "answer": "7", "student_correct": true, "teacher_correct": true}

`prompt` is the rendered prompt (after the chat template), `student` / `teacher` the decoded
greedy completions (special tokens skipped) from `opd.evaluate.greedy_completions`, the same
decoder the held-out evaluation uses. The prompts are the first `count` held-out examples, so
one prompt can be followed across steps. `answer` and the `*_correct` flags (the task's
verifier, else `generic_verify`) appear only for rows that have an answer; `teacher` is null
when there is no local teacher model. The teacher is frozen, so its completions are computed
once per prompt and reused.

Sampling never changes training: it runs under `torch.no_grad` with the random-number
state saved and restored, so a run with samples trains exactly as one without.
Resume: `write_samples` first drops rows with a step >= its own (a re-run of a step replaces
its rows rather than duplicating them), and `truncate_samples(run_dir, resume_step)` drops
rows after the checkpoint's step, as MetricsLog does for metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import torch

from opd.evaluate import generic_verify, greedy_completions

SAMPLES_FILE = "samples.jsonl"

# teacher module -> {(prompt ids, max_new_tokens, backend): completion ids}
_TEACHER_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sample_due(step: int, every: int) -> bool:
    """Whether optimizer step `step` (1-based, after the update) is a sample point."""
    return every > 0 and step > 0 and step % every == 0


def read_samples(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / SAMPLES_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_samples(run_dir: Path, step: int) -> int:
    """Drop rows of RUN/samples.jsonl with a step > `step` (atomically); returns how many."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            dropped += 1
            continue
        if isinstance(row, dict) and row.get("step", 0) > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, path)
    return dropped


def _rng_devices(models) -> list:
    devices = {p.device for p in models.student.parameters() if p.device.type == "cuda"}
    return sorted(devices, key=str)


def _teacher_completions(models, examples, max_new_tokens: int, backend: str):
    teacher = models.teacher
    if (
        not isinstance(teacher, torch.nn.Module)
        or teacher is models.student  # model.teacher=self (not frozen: no cache)
        or getattr(models, "teacher_tokenizer", None)  # [crosstok] another tokenizer: none
    ):
        return [None] * len(examples)
    cache = _TEACHER_CACHE.setdefault(teacher, {})
    keys = [(tuple(ex.prompt_ids), max_new_tokens, backend) for ex in examples]
    todo = [ex for ex, key in zip(examples, keys) if key not in cache]
    if todo:
        comps = greedy_completions(
            teacher, todo, models.pad_id, models.stop_ids, max_new_tokens, backend=backend
        )
        for ex, comp in zip(todo, comps):
            cache[(tuple(ex.prompt_ids), max_new_tokens, backend)] = list(comp)
    return [cache[key] for key in keys]


@torch.no_grad()
def sample_rows(
    models, examples, step: int, *, max_new_tokens: int, verify=None, backend: str = "auto"
) -> list[dict]:
    """Rows for `examples` at `step` (no file written); the RNG state is left unchanged."""
    verify = verify or generic_verify
    tok = models.tokenizer
    with torch.random.fork_rng(devices=_rng_devices(models)):
        student = greedy_completions(
            models.student,
            examples,
            models.pad_id,
            models.stop_ids,
            max_new_tokens,
            backend=backend,
        )
        teacher = _teacher_completions(models, examples, max_new_tokens, backend)
    rows = []
    for ex, s_ids, t_ids in zip(examples, student, teacher):
        row = {
            "step": int(step),
            "prompt": ex.prompt_text,
            "student": tok.decode(s_ids, skip_special_tokens=True),
            "teacher": None if t_ids is None else tok.decode(t_ids, skip_special_tokens=True),
        }
        if ex.answer is not None:
            row["answer"] = ex.answer
            row["student_correct"] = bool(verify(row["student"], ex.answer))
            if row["teacher"] is not None:
                row["teacher_correct"] = bool(verify(row["teacher"], ex.answer))
        rows.append(row)
    return rows


def write_samples(
    run_dir: Path,
    step: int,
    models,
    examples,
    *,
    max_new_tokens: int,
    count: int,
    trackers=None,
    verify=None,
    backend: str = "auto",
) -> list[dict]:
    """Append the samples of step `step` to RUN/samples.jsonl and send them to `trackers`.

    Args:
      run_dir: the run folder.
      step: the optimizer step just finished (the row's "step", as in metrics.jsonl).
      models: `opd.build.Models` (student, teacher, tokenizer).
      examples: held-out examples (`opd.data.Example`); the first `count` are used.
      max_new_tokens: longest completion (`sampling.max_new_tokens`).
      count: how many prompts (`train.sample_count`).
      trackers: an `opd.tracking.Trackers` (or None).
      verify: `verify(text, answer) -> bool` for the `*_correct` flags (default
        `generic_verify`).
      backend: the `sampling.backend` name used for decoding.
    Returns the rows written (empty when there are no examples).
    """
    chosen = list(examples)[: max(0, int(count))]
    if not chosen:
        return []
    rows = sample_rows(
        models, chosen, step, max_new_tokens=max_new_tokens, verify=verify, backend=backend
    )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    truncate_samples(run_dir, step - 1)  # a re-run of this step replaces its rows
    with open(run_dir / SAMPLES_FILE, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        fh.flush()
    if trackers is not None:
        trackers.log_samples(step, rows)
    return rows
