"""Divergences and log-probabilities from hidden states and lm_head weights, in row chunks.

The plain way to get a per-token divergence is to project both models' final hidden states
through their lm_heads, `logits_NV = hidden_ND @ head_VD.T`, and call `divergence(...)`. For
N completion tokens and a vocabulary of V that is an N×V tensor per model, and autograd keeps
several more of the same size (log-probabilities, probabilities, their difference, the
gradients). The arithmetic, for N = 4096 tokens and SmolLM2's V = 49,152 in float32:

    4096 × 49,152 × 4 bytes = 805 MB for one N×V tensor

and the materialized forward + backward of forward_kl peaks at about seven of them (5.4 GiB
measured above the inputs; see benchmarks/results_chunked.md).

This module never builds an N×V tensor. It walks the N rows in chunks of C rows, and holds at
most one C×V logits block per model at a time, plus the transient intermediates of that
chunk's divergence (with C = 1024: 201 MB per block). Its peak is the same number of blocks at
C rows instead of N, plus the V×D float32 weight-gradient buffer (113 MB for SmolLM2): at
N = 4096 measured 0.24–0.29 of the materialized peak with C = 1024 and 0.13–0.17 with
C = 512. A custom `torch.autograd.Function`:

    forward   for each chunk, under no_grad: logits_CV = h_CD @ W_VD.T (+ b_V) for both
              models, values[chunk] = divergence(student, teacher). Nothing per chunk is kept.
    backward  for each chunk: recompute both logits blocks, make the student block a leaf
              that requires grad, run the registered divergence on it, and take
              dZ_CV = autograd.grad(values_C, logits_CV, grad_out[chunk]). Then
              grad_h[chunk] = dZ_CV @ W_VD,  grad_W += dZ_CV.T @ h_CD,  grad_b += Σ_rows dZ_CV.

The price is recomputation: the backward repeats the lm_head matmul of each model once (one
extra (N×D)·(D×V) product per model), in exchange for memory that no longer grows with N·V.
Because the backward differentiates the registered reference function itself, the path is
generic: every divergence in `DIVERGENCES`, including ones registered later (e.g. by
`opd.losses.adaptive`), works here without a hand-written gradient.

The teacher is a constant: gradients flow to the student's hidden states, lm_head weight and
bias only. Teacher tensors that require grad get no gradient (they are detached).

One pass instead of two, when each row's loss weight is known in advance:
`opd.losses.one_pass`.

Reference twins (the tests check agreement in value and gradient):

    chunked_divergence(name, h_s, W_s, h_t, W_t)  ==  divergence(name, h_s @ W_s.T, h_t @ W_t.T)
    chunked_token_logprobs(h, W, ids)            ==  token_logprobs(h @ W.T, ids)
    chunked_topk(h, W, k)                        ==  log_softmax(h @ W.T / τ).topk(k)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from opd.losses.divergences import get_divergence, log_probs, upcast

RowFn = Callable[[Tensor, int, int], Tensor]
"""row_fn(student_logits_CV, start, end) -> (C,) values for rows start:end."""


def token_logprobs(logits_NV: Tensor, target_ids_N: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / τ)[target] per row: the log-probability of one token per position.

    Args:
        logits_NV: (..., V) logits.
        target_ids_N: (...) integer token ids in [0, V).
        temperature: τ > 0.

    Returns:
        (...) log-probabilities, at least float32.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_probs_NV = log_probs(logits_NV, temperature)
    return log_probs_NV.gather(-1, target_ids_N.unsqueeze(-1)).squeeze(-1)


def _project(hidden_CD: Tensor, head_VD: Tensor, bias_V: Tensor | None) -> Tensor:
    """logits_CV = hidden_CD @ head_VD.T (+ bias_V)."""
    if bias_V is None:
        return hidden_CD @ head_VD.T
    return torch.addmm(bias_V, hidden_CD, head_VD.T)


class _ChunkedHeadFunction(torch.autograd.Function):
    """values_N = row_fn(hidden_ND @ head_VD.T + bias_V), evaluated and differentiated by rows."""

    @staticmethod
    def forward(ctx, hidden_ND, head_VD, bias_V, row_fn, chunk_size, out_dtype):
        n_rows = hidden_ND.shape[0]
        values_N = hidden_ND.new_empty(n_rows, dtype=out_dtype)
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            logits_CV = _project(hidden_ND[start:end], head_VD, bias_V)
            values_N[start:end] = row_fn(logits_CV, start, end)
            del logits_CV  # free the block before the next chunk's matmul allocates one
        ctx.save_for_backward(hidden_ND, head_VD, bias_V)
        ctx.row_fn = row_fn
        ctx.chunk_size = chunk_size
        return values_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values_N):
        hidden_ND, head_VD, bias_V = ctx.saved_tensors
        need_hidden, need_head, need_bias = ctx.needs_input_grad[:3]
        # Accumulate weight gradients over chunks in at least float32 (bf16 sums drift).
        acc_dtype = torch.promote_types(head_VD.dtype, torch.float32)
        grad_hidden_ND = torch.zeros_like(hidden_ND) if need_hidden else None
        grad_head_VD = grad_bias_V = None
        if need_head:
            grad_head_VD = torch.zeros(head_VD.shape, dtype=acc_dtype, device=head_VD.device)
        if need_bias:
            grad_bias_V = torch.zeros(head_VD.shape[0], dtype=acc_dtype, device=head_VD.device)
        n_rows = hidden_ND.shape[0]
        for start in range(0, n_rows, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n_rows)
            hidden_CD = hidden_ND[start:end]
            with torch.no_grad():
                logits_CV = _project(hidden_CD, head_VD, bias_V)
            logits_CV.requires_grad_()  # a leaf: autograd.grad stops here, not at the matmul
            with torch.enable_grad():
                values_C = ctx.row_fn(logits_CV, start, end)
                (grad_logits_CV,) = torch.autograd.grad(
                    values_C,
                    logits_CV,
                    grad_outputs=grad_values_N[start:end].to(values_C.dtype),
                    allow_unused=True,
                )
            del values_C, logits_CV
            if grad_logits_CV is None:  # the values do not depend on the student here
                continue
            if need_hidden:
                grad_hidden_ND[start:end] = grad_logits_CV @ head_VD
            if need_head:
                grad_head_VD.addmm_(grad_logits_CV.T.to(acc_dtype), hidden_CD.to(acc_dtype))
            if need_bias:
                grad_bias_V += grad_logits_CV.sum(0).to(acc_dtype)
            del grad_logits_CV
        if grad_head_VD is not None:
            grad_head_VD = grad_head_VD.to(head_VD.dtype)
        if grad_bias_V is not None:
            grad_bias_V = grad_bias_V.to(bias_V.dtype)
        return grad_hidden_ND, grad_head_VD, grad_bias_V, None, None, None


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


def _check_model(prefix: str, hidden_ND: Tensor, head_VD: Tensor, bias_V: Tensor | None) -> None:
    """Shapes and dtypes of one model's hidden states, lm_head weight and bias.

    `prefix` ("student_", "teacher_" or "") names the arguments in the error messages.
    """
    if hidden_ND.dim() != 2:
        raise ValueError(
            f"{prefix}hidden must be (N, D), got shape {tuple(hidden_ND.shape)}; "
            "flatten (B, T, D) to the completion rows first"
        )
    if head_VD.dim() != 2:
        raise ValueError(f"{prefix}head must be (V, D), got shape {tuple(head_VD.shape)}")
    if hidden_ND.shape[1] != head_VD.shape[1]:
        raise ValueError(
            f"{prefix}hidden has D = {hidden_ND.shape[1]} but {prefix}head {tuple(head_VD.shape)} "
            f"has D = {head_VD.shape[1]}"
        )
    if hidden_ND.dtype != head_VD.dtype:
        raise ValueError(
            f"{prefix}hidden dtype {hidden_ND.dtype} != {prefix}head dtype {head_VD.dtype}"
        )
    if bias_V is not None and tuple(bias_V.shape) != (head_VD.shape[0],):
        raise ValueError(
            f"{prefix}bias must be (V,) = ({head_VD.shape[0]},), got {tuple(bias_V.shape)}"
        )


def _value_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the divergences return: float32, or float64 if any input is float64."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def chunked_divergence(
    name: str,
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 512,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    **params: float,
) -> Tensor:
    """Per-token divergence `name` from hidden states and lm_heads, without (N, V) logits.

    Equal to `divergence(name, student_hidden @ student_head.T, teacher_hidden @
    teacher_head.T, temperature, **params)` in value and in gradient with respect to the
    student's inputs, at the memory of one chunk.

    Args:
        name: a key of `DIVERGENCES`.
        student_hidden: (N, D_s) student final hidden states of the counted tokens.
        student_head: (V, D_s) student lm_head weight.
        teacher_hidden: (N, D_t) teacher final hidden states of the same tokens.
        teacher_head: (V, D_t) teacher lm_head weight.
        temperature: τ > 0, applied to both logits.
        chunk_size: rows per chunk C; peak memory grows with C·V, not N·V.
        student_bias: optional (V,) student lm_head bias (receives a gradient).
        teacher_bias: optional (V,) teacher lm_head bias.
        **params: the divergence's own parameters, e.g. beta=0.5.

    Returns:
        (N,) per-token values, float32 (float64 for float64 inputs). Gradients flow to
        student_hidden, student_head and student_bias; the teacher is treated as constant.
    """
    fn = get_divergence(name, params)
    _check_chunk_size(chunk_size)
    _check_model("student_", student_hidden, student_head, student_bias)
    _check_model("teacher_", teacher_hidden, teacher_head, teacher_bias)
    if student_head.shape[0] != teacher_head.shape[0]:
        raise ValueError(
            f"student_head has V = {student_head.shape[0]} but teacher_head has "
            f"V = {teacher_head.shape[0]}; the vocabularies must match"
        )
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"student_hidden has N = {student_hidden.shape[0]} rows but teacher_hidden has "
            f"N = {teacher_hidden.shape[0]}"
        )
    row_fn = _teacher_row_fn(fn, params, temperature, teacher_hidden, teacher_head, teacher_bias)
    out_dtype = _value_dtype(student_hidden.dtype, teacher_hidden.dtype)
    return _ChunkedHeadFunction.apply(
        student_hidden, student_head, student_bias, row_fn, chunk_size, out_dtype
    )


def _teacher_row_fn(fn, params, temperature, teacher_hidden, teacher_head, teacher_bias) -> RowFn:
    """row_fn(student_logits_CV, start, end) = fn(student, teacher logits of rows start:end);
    the teacher is a constant (detached), its logits formed one chunk at a time."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    teacher_hidden, teacher_head = teacher_hidden.detach(), teacher_head.detach()
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()

    def row_fn(student_logits_CV: Tensor, start: int, end: int) -> Tensor:
        with torch.no_grad():
            teacher_logits_CV = _project(teacher_hidden[start:end], teacher_head, teacher_bias)
        return fn(student_logits_CV, teacher_logits_CV, temperature, **params)

    return row_fn


def chunked_token_logprobs(
    hidden: Tensor,
    head: Tensor,
    target_ids: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 512,
    *,
    bias: Tensor | None = None,
) -> Tensor:
    """log softmax(hidden @ head.T / τ)[target] per row, without (N, V) logits.

    The sampled-token signals (e.g. log q(y_t) for a policy gradient) need only one entry
    per row; this computes it chunk by chunk with the same memory rule and backward as
    `chunked_divergence`.

    Args:
        hidden: (N, D) final hidden states.
        head: (V, D) lm_head weight.
        target_ids: (N,) integer token ids in [0, V).
        temperature: τ > 0.
        chunk_size: rows per chunk.
        bias: optional (V,) lm_head bias.

    Returns:
        (N,) log-probabilities, float32 (float64 for float64 inputs), differentiable with
        respect to hidden, head and bias.
    """
    _check_chunk_size(chunk_size)
    _check_model("", hidden, head, bias)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if target_ids.shape != (hidden.shape[0],):
        raise ValueError(
            f"target_ids must be (N,) = ({hidden.shape[0]},), got {tuple(target_ids.shape)}"
        )
    if target_ids.dtype.is_floating_point or target_ids.dtype == torch.bool:
        raise ValueError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    vocab = head.shape[0]
    if target_ids.numel() and (target_ids.min() < 0 or target_ids.max() >= vocab):
        raise ValueError(f"target_ids must lie in [0, V) = [0, {vocab})")
    target_ids = target_ids.long()

    def row_fn(logits_CV: Tensor, start: int, end: int) -> Tensor:
        return token_logprobs(logits_CV, target_ids[start:end], temperature)

    return _ChunkedHeadFunction.apply(
        hidden, head, bias, row_fn, chunk_size, _value_dtype(hidden.dtype)
    )


@torch.no_grad()
def chunked_topk(
    hidden: Tensor,
    head: Tensor,
    k: int,
    temperature: float = 1.0,
    chunk_size: int = 512,
    *,
    bias: Tensor | None = None,
    target_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """The k most likely tokens per row and their log-probabilities, without (N, V) logits.

    For teacher top-k access (no gradient). Equal to `log_softmax(hidden @ head.T / τ).topk(k)`.
    With `target_ids` (N,), the same pass over the vocabulary also returns each row's
    log-probability of its target (what `chunked_token_logprobs` computes, its reference twin
    in the tests), so a teacher's top-k and sampled-token scores cost one projection.

    Args:
        hidden: (N, D) final hidden states.
        head: (V, D) lm_head weight.
        k: 1 <= k <= V.
        temperature: τ > 0.
        chunk_size: rows per chunk.
        bias: optional (V,) lm_head bias.

    Returns:
        topk_logprobs (N, k), float32 (float64 for float64 inputs), descending per row, and
        topk_ids (N, k) int64; with `target_ids`, also target_logprobs (N,).
    """
    _check_chunk_size(chunk_size)
    _check_model("", hidden, head, bias)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = head.shape[0]
    if not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer in [1, V] = [1, {vocab}], got {k!r}")
    n_rows = hidden.shape[0]
    out_dtype = _value_dtype(hidden.dtype)
    topk_logprobs_NK = torch.empty(n_rows, k, dtype=out_dtype, device=hidden.device)
    topk_ids_NK = torch.empty(n_rows, k, dtype=torch.long, device=hidden.device)
    target_N = (
        None if target_ids is None else torch.empty(n_rows, dtype=out_dtype, device=hidden.device)
    )
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        scaled_CV = upcast(_project(hidden[start:end], head, bias)) / temperature
        lse_C1 = torch.logsumexp(scaled_CV, -1, keepdim=True)
        # The top-k of the log-probabilities is the top-k of the logits shifted by logsumexp.
        values_CK, ids_CK = scaled_CV.topk(k, dim=-1)
        topk_logprobs_NK[start:end] = values_CK - lse_C1
        topk_ids_NK[start:end] = ids_CK
        if target_N is not None:
            picked_C1 = scaled_CV.gather(-1, target_ids[start:end, None].to(hidden.device))
            target_N[start:end] = (picked_C1 - lse_C1)[:, 0]
        del scaled_CV
    if target_N is None:
        return topk_logprobs_NK, topk_ids_NK
    return topk_logprobs_NK, topk_ids_NK, target_N
