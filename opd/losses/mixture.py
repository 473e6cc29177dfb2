"""Divergences to a mixture of teachers (multi-teacher ensemble, survey eq. 31).

The ensemble teacher is p = Σ_k w_k · p_k with p_k = softmax(z_k / τ), Σ_k w_k = 1. We
represent it by "logits" whose tempered softmax is exactly the mixture:

    z_mix = τ · log Σ_k w_k · softmax(z_k / τ)      so that  softmax(z_mix / τ) = p

(log-sum-exp over k, never forming probabilities that could underflow), and hand z_mix to
any registered divergence. `chunked_mixture_divergence` does this one row chunk at a time on
top of the same custom autograd function as `chunked_divergence`, so no (N, V) tensor of any
model is held; `mixture_logits` + `divergence` is its plain reference twin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from opd.losses.chunked import (
    _check_chunk_size,
    _check_model,
    _ChunkedHeadFunction,
    _project,
    _value_dtype,
)
from opd.losses.divergences import get_divergence, log_probs


def check_weights(weights: Sequence[float], k: int) -> list[float]:
    """Validate and normalise mixture weights (positive, one per teacher)."""
    w = [float(x) for x in weights]
    if len(w) != k:
        raise ValueError(f"teacher weights: got {len(w)} weights for {k} teachers")
    if any(not x > 0 or not math.isfinite(x) for x in w):
        raise ValueError(f"teacher weights must be positive and finite, got {w}")
    total = sum(w)
    return [x / total for x in w]


def mixture_logits(
    teacher_logits: Sequence[Tensor], weights: Sequence[float], temperature: float = 1.0
) -> Tensor:
    """Logits z_mix with softmax(z_mix / τ) = Σ_k w_k softmax(z_k / τ).

    Args:
        teacher_logits: K tensors (..., V).
        weights: K positive weights (normalised here).
        temperature: τ > 0.

    Returns:
        (..., V) mixture logits, at least float32.
    """
    w = check_weights(weights, len(teacher_logits))
    stacked = torch.stack(
        [log_probs(z, temperature) + math.log(wk) for z, wk in zip(teacher_logits, w)]
    )
    return temperature * torch.logsumexp(stacked, dim=0)


def chunked_mixture_divergence(
    name: str,
    student_hidden: Tensor,
    student_head: Tensor,
    teachers: Sequence[tuple[Tensor, Tensor]],
    weights: Sequence[float],
    temperature: float = 1.0,
    chunk_size: int = 512,
    **params: float,
) -> Tensor:
    """Per-token divergence between a mixture of teachers and the student, in row chunks.

    Args:
        name: a key of `DIVERGENCES`.
        student_hidden: (N, D_s); student_head: (V, D_s).
        teachers: K pairs (teacher_hidden (N, D_k), teacher_head (V, D_k)).
        weights: K positive mixture weights (normalised).
        temperature, chunk_size, **params: as in `chunked_divergence`.

    Returns:
        (N,) values equal to `divergence(name, h_s @ W_s.T, mixture_logits([h_k @ W_k.T], w))`;
        gradients flow to the student only.
    """
    fn = get_divergence(name, params)
    _check_chunk_size(chunk_size)
    _check_model("student_", student_hidden, student_head, None)
    w = check_weights(weights, len(teachers))
    frozen = []
    for i, (h, W) in enumerate(teachers):
        _check_model(f"teacher{i}_", h, W, None)
        if W.shape[0] != student_head.shape[0] or h.shape[0] != student_hidden.shape[0]:
            raise ValueError(
                f"teacher {i}: shapes {tuple(h.shape)}, {tuple(W.shape)} do not match the student's "
                f"{tuple(student_hidden.shape)}, {tuple(student_head.shape)}"
            )
        frozen.append((h.detach(), W.detach()))

    def row_fn(student_logits_CV: Tensor, start: int, end: int) -> Tensor:
        with torch.no_grad():
            mix_CV = mixture_logits(
                [_project(h[start:end], W, None) for h, W in frozen], w, temperature
            )
        return fn(student_logits_CV, mix_CV, temperature, **params)

    out_dtype = _value_dtype(student_hidden.dtype, *(h.dtype for h, _ in frozen))
    return _ChunkedHeadFunction.apply(
        student_hidden, student_head, None, row_fn, chunk_size, out_dtype
    )
