"""Compute accounting of the quality benchmark: estimated FLOPs per micro-batch.

The 2N / 6N rule of Kaplan et al. 2020: a micro-batch with P prompt and C completion tokens
(padding excluded) costs

    generation   2 · N_writer  · (P + C)     prefill + one decode step per token (KV cache)
    teacher      2 · N_teacher · (P + C)     one scoring forward
    student      6 · N_student · (P + C)     forward + backward

N is a model's parameter count without its input embedding table (a lookup; the lm_head
counts). N_writer is 0 for dataset completions, N_student on-policy, N_teacher for seqkd,
λ·N_student + (1−λ)·N_other for GKD's mixture (per step, from the logged `student_share`),
N_student + N_teacher for token-level interleaved sources (both models decode).

Deviations and limits: attention's L² term is ignored (the benchmark's sequences are under
64 tokens); extra forwards some recipes make (reference models, verifiers) are not counted.
"""

from __future__ import annotations

from opd.sampling.sources import DatasetPrefixes, Mix, StudentPrefixes, TeacherPrefixes


def flop_params(model) -> int:
    """Parameters that cost multiply-adds: all of them except the input embedding table."""
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if emb is head else total - emb.numel()


def microbatch_flops(
    *,
    n_student: float,
    n_teacher: float,
    n_writer: float,
    prompt_tokens: float,
    completion_tokens: float,
) -> float:
    """Estimated FLOPs of one micro-batch: generation + teacher scoring + student training.

    Example: N_s = 100, N_t = 300, on-policy (N_writer = N_s), P = 10, C = 5:
    2·100·15 + 2·300·15 + 6·100·15 = 3,000 + 9,000 + 9,000 = 21,000.
    """
    tokens = prompt_tokens + completion_tokens
    return 2 * n_writer * tokens + 2 * n_teacher * tokens + 6 * n_student * tokens


def writer_params(prefixes, n_student: float, n_teacher: float, student_share=None) -> float:
    """N_writer of a prefix source: the parameters that decode each completion token."""
    if isinstance(prefixes, Mix):
        share = prefixes.student if student_share is None else student_share
        return share * n_student + (1 - share) * (0.0 if prefixes.other == "dataset" else n_teacher)
    if isinstance(prefixes, DatasetPrefixes):
        return 0.0
    if isinstance(prefixes, StudentPrefixes):
        return n_student
    if isinstance(prefixes, TeacherPrefixes):
        return n_teacher
    return n_student + n_teacher if getattr(prefixes, "needs_teacher_model", False) else n_student
