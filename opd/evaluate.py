"""Held-out measurements: how close the student is to the teacher, and task accuracy.

- `heldout_kl`: the student writes greedy completions for held-out prompts; at every
  completion token we compute KL(q_student ‖ p_teacher) over the full vocabulary, and report
  the mean over all completion tokens of all prompts (token mean). This is the quantity
  on-policy reverse-KL distillation minimises, measured on the student's own outputs.
- `task_accuracy`: greedy completions scored by a verifier (the shipped task's, or a generic
  final-answer match for prompt files with an `answer` field).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from opd.context import StepContext
from opd.models import decoder_and_head
from opd.sampling import GenerationParams, make_backend, make_rollout
from opd.signals import Divergence
from opd.teachers import FullLogits, SampledLogprobs
from opd.teachers.base import as_teacher, teacher_model
from opd.types import StudentRows, TeacherScores, completion_rows

_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def generic_verify(text: str, answer: str) -> bool:
    """Final-answer match: the last number in `text` equals a numeric answer, else the
    stripped text ends with the answer (case-insensitive)."""
    answer = str(answer).strip()
    if _NUM.fullmatch(answer):
        nums = _NUM.findall(text)
        return bool(nums) and float(nums[-1]) == float(answer)
    return text.strip().lower().endswith(answer.lower())


@torch.no_grad()
def greedy_completions(
    model, examples, pad_id, stop_ids, max_new_tokens, batch_size=16, backend="auto"
):
    """Greedy completions of `examples` (`backend`: a `sampling.backend` name)."""
    backend = make_backend(backend, batch_size)
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return backend.generate(
        model, [ex.prompt_ids for ex in examples], params, pad_id=pad_id, stop_ids=stop_ids
    )


def _as_float(ts: TeacherScores) -> TeacherScores:
    if ts.members:
        return TeacherScores(
            members=tuple(_as_float(m) for m in ts.members), member_weights=ts.member_weights
        )
    return TeacherScores(hidden_ND=ts.hidden_ND.float(), head_VD=ts.head_VD.float())


def _per_token(rows, teacher, rollout, vocab_size, chunk_size):
    """("kl", KL(q_student ‖ p_teacher) per token over the full vocabulary) with a teacher
    that gives full logits, else ("nll", −log p_teacher(y_t) of the student's tokens)."""
    t, ctx = as_teacher(teacher), StepContext(chunk_size=chunk_size)
    if "full_logits" in t.provides:
        tscores = _as_float(FullLogits().score(t, rollout, vocab_size))
        return "kl", Divergence("reverse_kl")(rows, tscores, ctx), tscores
    tscores = SampledLogprobs(chunk_size).score(t, rollout, vocab_size)
    return "nll", -tscores.token_logprobs_N, tscores


@torch.no_grad()
def heldout_kl(
    student,
    teacher,
    examples,
    *,
    pad_id: int,
    stop_ids,
    vocab_size: int,
    max_new_tokens: int,
    batch_size: int = 16,
    chunk_size: int = 512,
    tokenizer=None,
    verify=None,
    on_batch=None,
) -> dict:
    """Token-mean KL(q_student ‖ p_teacher) on greedy student completions.

    `on_batch(rows, teacher_scores, rollout)`, if given, sees every scored batch (the
    diagnostics of `opd.diagnostics` reuse these forward passes).

    With a `tokenizer`, the same greedy completions are also scored for answer accuracy
    (`verify`, default `generic_verify`) on the examples that have an answer, so one
    generation pass serves both numbers.

    Returns:
      {"kl": float | None, "teacher_nll": float | None, "tokens": int, "mean_length": float,
       "accuracy": float | None, "completions": list[list[int]]}: `kl` with a teacher that gives full logits; otherwise (a
      served teacher) `kl` is None and `teacher_nll` is the token-mean −log p_teacher(y_t) of
      the student's greedy tokens (lower: the teacher finds the student's outputs likelier).
    """
    comps = greedy_completions(student, examples, pad_id, stop_ids, max_new_tokens, batch_size)
    accuracy = None
    if tokenizer is not None:
        accuracy = _score(tokenizer, examples, comps, verify or generic_verify)["accuracy"]
    s_dec, s_head, _ = decoder_and_head(student, verify=False)
    total, count = 0.0, 0
    provides = as_teacher(teacher).provides
    full = "full_logits" in provides
    # [black-box] a teacher that only writes text is never asked for log-probs: no KL, no NLL
    scored = full or "token_logprobs" in provides
    for start in range(0, len(examples) if scored else 0, batch_size):
        exs = examples[start : start + batch_size]
        ro = make_rollout(
            [e.prompt_ids for e in exs], comps[start : start + batch_size], pad_id, "student"
        )
        if ro.num_tokens == 0:
            continue
        device = s_head.device
        hidden_ND = completion_rows(
            s_dec(ro.input_ids_BL.to(device), ro.attention_mask_BL.to(device)), ro
        )
        rows = StudentRows(hidden_ND.float(), s_head[:vocab_size].float(), None, None)
        kind, values_N, tscores = _per_token(rows, teacher, ro, vocab_size, chunk_size)
        if on_batch is not None:
            on_batch(rows, tscores, ro)
        total += float(values_N.sum())
        count += values_N.numel()
    lengths = [len(c) for c in comps]
    return {
        "kl": total / max(count, 1) if full else None,
        "teacher_nll": total / max(count, 1) if scored and not full else None,
        "tokens": count,
        "mean_length": sum(lengths) / max(len(lengths), 1),
        "accuracy": accuracy,
        "completions": comps,  # the greedy token ids (opd.diagnostics)
    }


def _score(tokenizer, examples, comps, verify) -> dict:
    """Accuracy of completions `comps` (token lists) on the examples that have an answer."""
    pairs = [(ex, c) for ex, c in zip(examples, comps) if ex.answer is not None]
    if not pairs:
        return {"accuracy": None, "n": 0, "samples": []}
    texts = [tokenizer.decode(c, skip_special_tokens=True) for _, c in pairs]
    correct = [bool(verify(t, ex.answer)) for t, (ex, _) in zip(texts, pairs)]
    samples = [
        {"prompt": ex.prompt_text[-200:], "completion": t, "answer": ex.answer, "correct": ok}
        for (ex, _), t, ok in list(zip(pairs, texts, correct))[:3]
    ]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "samples": samples}


@torch.no_grad()
def task_accuracy(
    model, tokenizer, examples, *, pad_id, stop_ids, max_new_tokens, verify=None, batch_size=16
) -> dict:
    """Exact final-answer accuracy of greedy completions (rows without an answer are skipped)."""
    scored = [ex for ex in examples if ex.answer is not None]
    comps = greedy_completions(model, scored, pad_id, stop_ids, max_new_tokens, batch_size)
    return _score(tokenizer, scored, comps, verify or generic_verify)


@dataclass
class EvalTable:
    """The before/after table of a run (or of `opd eval`)."""

    rows: list  # (label, kl or None, accuracy or None)

    def render(self) -> str:
        head = f"{'model':<22} {'KL(q_student ‖ p_teacher)':>27} {'accuracy':>10}"
        lines = [head, "-" * len(head)]
        for label, kl, acc in self.rows:
            kl_s = "—" if kl is None else f"{kl:.4f}"
            acc_s = "—" if acc is None else f"{100 * acc:.1f}%"
            lines.append(f"{label:<22} {kl_s:>27} {acc_s:>10}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        lines = [
            "| model | KL(q_student ‖ p_teacher), held-out, greedy | accuracy |",
            "|---|---|---|",
        ]
        for label, kl, acc in self.rows:
            kl_s = "—" if kl is None else f"{kl:.4f}"
            acc_s = "—" if acc is None else f"{100 * acc:.1f}%"
            lines.append(f"| {label} | {kl_s} | {acc_s} |")
        return "\n".join(lines)


def teacher_row(models, data, cfg):
    """Answer accuracy of the teacher on the held-out prompts (one greedy pass)."""
    verify = data.task.verify if data.task is not None else None
    local = teacher_model(models.teacher)  # None: served, it cannot write here
    if local is None or getattr(models, "teacher_tokenizer", None) is not None:  # [crosstok]
        return {"accuracy": None, "n": 0, "samples": []}  # prompts are the student's ids
    return task_accuracy(
        local,
        models.tokenizer,
        data.eval,
        pad_id=models.pad_id,
        stop_ids=models.stop_ids,
        max_new_tokens=cfg.sampling.max_new_tokens,
        verify=verify,
    )
