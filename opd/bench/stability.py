"""The quality benchmark's evaluation of a student, and every run's stability record.

`evaluate_student` scores a student on a JSONL split (the held-out set, or the validation
split of the learning-rate sweep) from one pass of greedy completions:

    accuracy        exact match by the task's verifier
    teacher_kl      token-mean KL(q_student ‖ p_teacher) on the student's own greedy text
    teacher_fkl     token-mean KL(p_teacher ‖ q_student) on the teacher's greedy text of the
                    same prompts (`opd.diagnostics`, `diag_fkl_teacher`)
    mean_length     completion tokens of the student's greedy text
    corrections_mean, with_correction, errors_mean   chain / sort tasks (`opd.tasks.recovery`)
    repetitive      share of completions with a loop: some 1-4 character string repeated
                    `REPEATS` or more times in a row (`3 3 3 3 3 3`, `=5=5=5=5=5=5`)
    marker_spam     share of completions with more than `SPAM_MARKERS` correction markers
                    (recoverable tasks' teachers train on at most 3 injected errors)

Collapse (`collapse_record`): a run is flagged when any of these holds at its end, each
reason named in the record together with the lr it ran at:

    nonfinite_loss     a step's loss is NaN or infinite
    repetition         `repetitive` ≥ SHARE and ≥ the warm-up checkpoint's share + 0.1
    marker_spam        `marker_spam` ≥ SHARE and ≥ the warm-up checkpoint's share + 0.1
    accuracy_collapse  final accuracy < half the warm-up checkpoint's (which was ≥ 10 %)

Loss spikes are counted in every record (`loss_spikes`, and `warnings: ["loss_spike"]`) but
do not by themselves make a collapse: a step's loss counts as a spike when it exceeds
SPIKE_FACTOR × the median of the previous SPIKE_WINDOW steps' losses, the median of the run's
first SPIKE_WINDOW losses (where it started) and SPIKE_FLOOR. Why not a verdict: recipes
that mix batches (GKD λ < 1, where a step is on- or off-policy by a coin) or change phase
(`staged`) change what their per-step loss measures from step to step; in the first
`chain_fix` sweep, healthy runs of those recipes at 100 % validation accuracy had 4-22 such
steps, and a spike-based verdict passed over their best lr.

The thresholds are choices, not taken from a paper: a quarter of the held-out completions
looping or spamming markers, or half the starting accuracy lost, is a failure a reader would
see in any sample. The record keeps the shares and counts, so a softer reading stays possible.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

from opd.data import encode_rows, load_rows
from opd.diagnostics import EvalDiagnostics
from opd.evaluate import heldout_kl
from opd.tasks import get_task
from opd.tasks.recoverable import count_corrections
from opd.tasks.recovery import recovery_task
from opd.tasks.teacher import generate_completions

REPEATS = 6
SPAM_MARKERS = 3
SPIKE_FACTOR, SPIKE_WINDOW, SPIKE_FLOOR = 5.0, 10, 0.05
SHARE = 0.25
_LOOP = re.compile(r"(.{1,4}?)\1{" + str(REPEATS - 1) + ",}", re.DOTALL)


def is_repetitive(text: str) -> bool:
    """True when some 1-4 character string repeats REPEATS or more times in a row."""
    return _LOOP.search(text) is not None


def text_stats(task_name: str, texts: list[str], rows: list[dict]) -> dict:
    """Accuracy, loops, and (chain / sort tasks) correction markers, spam and errors."""
    task, n = get_task(task_name), max(1, len(texts))
    out = {"accuracy": sum(task.verify(t, r["answer"]) for t, r in zip(texts, rows)) / n,
           "repetitive": sum(map(is_repetitive, texts)) / n}  # fmt: skip
    fix = recovery_task(task_name)
    if fix is not None:
        counts = [count_corrections(t) for t in texts] or [0]
        out.update(corrections_mean=sum(counts) / n, with_correction=sum(c > 0 for c in counts) / n,
                   marker_spam=sum(c > SPAM_MARKERS for c in counts) / n)  # fmt: skip
        if hasattr(fix, "count_errors") and rows:  # chain: wrong running values per completion
            out["errors_mean"] = sum(fix.count_errors(r["prompt"], t)
                                     for t, r in zip(texts, rows)) / n  # fmt: skip
    return out


def evaluate_student(models, setup, s, rows_file: str | None = None) -> dict:
    """The keys of the module docstring on `rows_file` (default: the held-out `setup.eval_file`);
    `s.kl_rows` of its prompts for the two KLs."""
    path = rows_file or setup.eval_file
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    texts = generate_completions(models.student, models.tokenizer, [r["prompt"] for r in rows],
                                 setup.max_new_tokens)  # fmt: skip
    out = text_stats(setup.task, texts, rows)
    loaded = load_rows(path).rows[: s.kl_rows]
    examples = encode_rows(loaded, models.tokenizer, use_chat_template=False).examples
    kw = dict(
        pad_id=models.pad_id,
        stop_ids=models.stop_ids,
        vocab_size=models.vocab_size,
        max_new_tokens=setup.max_new_tokens,
    )
    diag = EvalDiagnostics(models.student, models.teacher, examples, tokenizer=models.tokenizer,
                           **kw)  # fmt: skip
    kl = heldout_kl(models.student, models.teacher, examples, on_batch=diag.own_batch, **kw)
    fkl = diag.finish(kl["completions"]).get("diag_fkl_teacher")
    return {**out, "teacher_kl": kl["kl"], "teacher_fkl": fkl, "mean_length": kl["mean_length"]}


def loss_spikes(losses: list[float]) -> tuple[int, int]:
    """(non-finite losses, spikes): see the module docstring for the spike rule."""
    nonfinite, spikes = 0, 0
    first = [x for x in losses[:SPIKE_WINDOW] if math.isfinite(x)]
    start = statistics.median(first) if first else math.inf
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            nonfinite += 1
            continue
        window = [x for x in losses[max(0, i - SPIKE_WINDOW) : i] if math.isfinite(x)]
        bar = max(SPIKE_FLOOR, start, SPIKE_FACTOR * statistics.median(window or [math.inf]))
        spikes += len(window) == SPIKE_WINDOW and loss > bar
    return nonfinite, spikes


def collapse_record(losses: list[float], final: dict, start: dict, lr: float) -> dict:
    """`{"collapsed", "reasons", "lr", "loss_spikes", "nonfinite_losses", ...}` of one run:
    `final` is its last evaluation, `start` the warm-up checkpoint's (same split)."""
    nonfinite, spikes = loss_spikes(losses)
    reasons = ["nonfinite_loss"] * bool(nonfinite)
    for key, reason in (("repetitive", "repetition"), ("marker_spam", "marker_spam")):
        share = final.get(key) or 0.0
        if share >= SHARE and share >= (start.get(key) or 0.0) + 0.1:
            reasons.append(reason)
    if start["accuracy"] >= 0.1 and final["accuracy"] < 0.5 * start["accuracy"]:
        reasons.append("accuracy_collapse")
    return {"collapsed": bool(reasons), "reasons": reasons, "lr": lr, "loss_spikes": spikes,
            "warnings": ["loss_spike"] * bool(spikes),
            "nonfinite_losses": nonfinite, "repetitive": final.get("repetitive"),
            "marker_spam": final.get("marker_spam")}  # fmt: skip
