"""The weighted chunked divergence with its gradient taken in the forward pass.

When each row's loss coefficient c_n is known before the call (the
trainer's token-mean reduction of an unweighted divergence), `chunked_weighted_divergence`
returns Σ c_n · D_n and reduces each chunk's dZ_CV = c ⊙ ∂D/∂Z into grad_h and grad_W during
the forward pass; the backward only scales them. No logits are recomputed (one head matmul
per model instead of two), at the cost of holding grad_W (V × D) and grad_h (N × D) from the
forward pass to the backward.

Reference twin (the tests check agreement in value and gradient, and gradcheck):

    chunked_weighted_divergence(..., c)[0]  ==  (chunked_divergence(...) * c).sum()

The trainer uses it through `Divergence.weighted_loss` (`opd.step.one_pass_loss`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from opd.losses.chunked import (
    _check_chunk_size,
    _check_model,
    _project,
    _teacher_row_fn,
    _value_dtype,
)
from opd.losses.divergences import get_divergence


class _EagerChunkedLossFunction(torch.autograd.Function):
    """loss = Σ_n c_n · row_fn(hidden_n @ head.T + bias)_n with the gradient taken in the forward.

    The coefficients c_N are constants known before the call, so each chunk's dZ_CV can be
    reduced into the gradients at once: grad_h[chunk] = dZ_CV @ W, grad_W += dZ_CV.T @ h_CD.
    The backward only scales them by the incoming scalar gradient: no logits are recomputed.
    """

    @staticmethod
    def forward(ctx, hidden_ND, head_VD, bias_V, coef_N, row_fn, chunk_size, out_dtype):
        n_rows = hidden_ND.shape[0]
        acc_dtype = torch.promote_types(head_VD.dtype, torch.float32)
        values_N = hidden_ND.new_empty(n_rows, dtype=out_dtype)
        grad_hidden_ND = torch.zeros_like(hidden_ND)
        grad_head_VD = torch.zeros(head_VD.shape, dtype=acc_dtype, device=head_VD.device)
        grad_bias_V = None
        if bias_V is not None:
            grad_bias_V = torch.zeros(head_VD.shape[0], dtype=acc_dtype, device=head_VD.device)
        loss = torch.zeros((), dtype=out_dtype, device=hidden_ND.device)
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            hidden_CD = hidden_ND[start:end]
            logits_CV = _project(hidden_CD, head_VD, bias_V).requires_grad_()
            with torch.enable_grad():
                values_C = row_fn(logits_CV, start, end)
                (grad_logits_CV,) = torch.autograd.grad(
                    values_C, logits_CV, grad_outputs=coef_N[start:end].to(values_C.dtype),
                    allow_unused=True,
                )
            values_N[start:end] = values_C.detach()
            loss += (values_C.detach() * coef_N[start:end].to(values_C.dtype)).sum()
            del values_C, logits_CV
            if grad_logits_CV is None:
                continue
            grad_hidden_ND[start:end] = grad_logits_CV @ head_VD
            grad_head_VD.addmm_(grad_logits_CV.T.to(acc_dtype), hidden_CD.to(acc_dtype))
            if grad_bias_V is not None:
                grad_bias_V += grad_logits_CV.sum(0).to(acc_dtype)
            del grad_logits_CV
        ctx.save_for_backward(grad_hidden_ND, grad_head_VD.to(head_VD.dtype),
                              None if grad_bias_V is None else grad_bias_V.to(bias_V.dtype))
        ctx.mark_non_differentiable(values_N)
        return loss, values_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_values):
        grad_hidden_ND, grad_head_VD, grad_bias_V = ctx.saved_tensors
        need_hidden, need_head, need_bias = ctx.needs_input_grad[:3]
        scale = grad_loss
        return (
            grad_hidden_ND * scale.to(grad_hidden_ND.dtype) if need_hidden else None,
            grad_head_VD * scale.to(grad_head_VD.dtype) if need_head else None,
            grad_bias_V * scale.to(grad_bias_V.dtype) if need_bias and grad_bias_V is not None
            else None,
            None, None, None, None,
        )


def chunked_weighted_divergence(
    name: str,
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    coef_N: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 512,
    **params: float,
) -> tuple[Tensor, Tensor]:
    """Σ_n c_n · D_n with its gradient computed in the forward pass: one pass over the heads.

    When every token's loss coefficient c_n is a constant known in advance (token-mean or
    sequence-mean reduction, weights that do not depend on the values), the gradient of the
    weighted sum can be reduced chunk by chunk during the forward pass, so the backward never
    recomputes the two models' logits (the cost of `chunked_divergence`'s memory saving).
    Extra memory: the student head's gradient (V × D, float32) and the hidden states'
    gradient (N × D) are held from the forward pass to the backward pass.

    Reference twin (tested in value and gradient, float64 gradcheck):
    `(chunked_divergence(name, ...) * coef_N).sum()`.

    Returns:
        (loss, values_N): the weighted sum (differentiable with respect to the student's
        hidden states and head) and the per-token values (detached, for logging).
    """
    fn = get_divergence(name, params)
    _check_chunk_size(chunk_size)
    _check_model("student_", student_hidden, student_head, None)
    _check_model("teacher_", teacher_hidden, teacher_head, None)
    if coef_N.shape != (student_hidden.shape[0],):
        raise ValueError(
            f"coef_N must be (N,) = ({student_hidden.shape[0]},), got {tuple(coef_N.shape)}"
        )
    if student_head.shape[0] != teacher_head.shape[0] or (
        student_hidden.shape[0] != teacher_hidden.shape[0]
    ):
        raise ValueError("student and teacher must have the same rows N and vocabulary V")
    row_fn = _teacher_row_fn(fn, params, temperature, teacher_hidden, teacher_head, None)
    out_dtype = _value_dtype(student_hidden.dtype, teacher_hidden.dtype)
    return _EagerChunkedLossFunction.apply(
        student_hidden, student_head, None, coef_N.detach(), row_fn, chunk_size, out_dtype
    )
