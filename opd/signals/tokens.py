"""Per-token inputs of the sampled-token signals, and returns over the rows of a batch.

log q(y_t)   `student_token_logprobs` (differentiable; chunked, or the plain (N, V) twin)
log p(y_t)   `teacher_token_logprobs` (the sampled scores, or computed from full logits)
H(·)         `row_entropy`: −Σ_v π_v log π_v of softmax(hidden @ head.T / τ), row chunks
w_t          `sampler_weights`: the rollout's importance weights (1 where none)
R_t          `future_returns`: Σ_{t' ≥ t} γ^{t'−t} r_{t'} within each sequence, optionally
             truncated to K terms, shifted to R_{t+1}, or divided by the window's length
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from opd.context import StepContext
from opd.errors import ConfigError
from opd.losses import chunked_token_logprobs, token_logprobs
from opd.types import StudentRows, TeacherScores

# --- per-token inputs ------------------------------------------------------------------------


def student_token_logprobs(student: StudentRows, ctx: StepContext) -> Tensor:
    """(N,) log q(y_t), differentiable; the (N, V) reference path when ctx.materialize."""
    if ctx.materialize:
        return token_logprobs(student.hidden_ND @ student.head_VD.T, student.target_ids_N)
    return chunked_token_logprobs(
        student.hidden_ND, student.head_VD, student.target_ids_N, chunk_size=ctx.chunk_size
    )


@torch.no_grad()
def teacher_token_logprobs(
    teacher: TeacherScores, student: StudentRows, ctx: StepContext
) -> Tensor:
    """(N,) log p(y_t): the sampled scores if given, else computed from full-logits rows."""
    if teacher.token_logprobs_N is not None:
        return teacher.token_logprobs_N.detach()
    if teacher.hidden_ND is None:
        raise ConfigError("this signal needs the teacher's token log-probs or full logits")
    return chunked_token_logprobs(
        teacher.hidden_ND, teacher.head_VD, student.target_ids_N, chunk_size=ctx.chunk_size
    )


# --- row-chunked statistics of the logits (no grad, no (N, V) tensor) -------------------------


@torch.no_grad()
def row_stat(fn: Callable[..., Tensor], chunk_size: int, *pairs: tuple[Tensor, Tensor]) -> Tensor:
    """fn(logits_CV, ..., start, end) per row chunk, for one or more (hidden_ND, head_VD) pairs.

    Returns:
      (N,) float32 (float64 for float64 inputs) values, concatenated in row order.
    """
    n = pairs[0][0].shape[0]
    dtype = torch.float64 if pairs[0][0].dtype == torch.float64 else torch.float32
    # upcast each head once (a bf16 teacher head is converted here, not once per chunk)
    pairs = [(h, w.to(device=h.device, dtype=dtype)) for h, w in pairs]
    step = max(1, chunk_size)
    out = []
    for start in range(0, n, step):
        end = min(n, start + step)
        logits = [h[start:end].to(dtype) @ w.T for h, w in pairs]  # (C, V) per model
        out.append(fn(*logits, start, end))
    if not out:
        return torch.zeros(0, dtype=dtype, device=pairs[0][0].device)
    return torch.cat(out)


def row_entropy(
    hidden_ND: Tensor, head_VD: Tensor, temperature: float = 1.0, chunk_size: int = 512
) -> Tensor:
    """(N,) H = −Σ_v π_v log π_v of π = softmax(hidden_ND @ head_VD.T / τ), in nats, detached.

    The one entropy of the code base: `teacher_entropy` (token weights) and `student_entropy`
    (REOPOLD's token selection) are this function on either model's rows.
    """

    def entropy(logits_CV, _start, _end):
        log_pi = torch.log_softmax(logits_CV / temperature, dim=-1)
        return -(log_pi.exp() * log_pi).sum(-1)

    return row_stat(entropy, chunk_size, (hidden_ND, head_VD))


def student_entropy(student: StudentRows, chunk_size: int = 512) -> Tensor:
    """(N,) H(q_t) of the student (τ = 1), in row chunks, without gradient."""
    return row_entropy(student.hidden_ND, student.head_VD, 1.0, chunk_size)


def sampler_weights(ctx: StepContext, like_N: Tensor) -> Tensor:
    """(N,) the rollout's sampler weights w_t (1 where there are none)."""
    rollout = ctx.rollout
    if rollout is None or rollout.token_weight_BT is None:
        return torch.ones_like(like_N)
    mask_BT = rollout.completion_mask_BT.to(like_N.device).bool()
    return rollout.token_weight_BT.to(like_N.device)[mask_BT].to(like_N.dtype)


# --- returns over the rows of a batch --------------------------------------------------------


def pack_rows(x_N: Tensor, row_index_N: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """(N,) row-major tokens (`row_index_N` non-decreasing) -> x_BT (zeros past each row's
    end, T = longest row), mask_BT, and the (row, position) index with x_BT[index] == x_N."""
    n = x_N.shape[0]
    rows_N = row_index_N.long()
    count_B = torch.bincount(rows_N, minlength=int(rows_N.max()) + 1 if n else 0)
    start_B = torch.cumsum(count_B, 0) - count_B
    pos_N = torch.arange(n, device=x_N.device) - start_B[rows_N]
    shape = (count_B.shape[0], int(count_B.max()) if n else 0)
    x_BT = x_N.new_zeros(shape)
    mask_BT = torch.zeros(shape, dtype=torch.bool, device=x_N.device)
    x_BT[rows_N, pos_N] = x_N
    mask_BT[rows_N, pos_N] = True
    return x_BT, mask_BT, (rows_N, pos_N)


def discounted_returns(r_BT: Tensor, discount: float = 1.0, horizon: int | None = None) -> Tensor:
    """(B, T) R_t = Σ_{i=0}^{K−1} γ^i r_{t+i} of (B, T) rewards (0 past each end); K = horizon
    (None = to the end)."""
    T = r_BT.shape[1]
    if discount == 1.0:
        R_BT = r_BT.flip(1).cumsum(1).flip(1)
    else:
        acc_B, cols = torch.zeros_like(r_BT[:, 0]), []
        for t in reversed(range(T)):
            acc_B = r_BT[:, t] + discount * acc_B
            cols.append(acc_B)
        R_BT = torch.stack(cols[::-1], dim=1) if cols else r_BT.clone()
    if horizon is not None and horizon < T:
        # R_t = Σ_{i<K} γ^i r_{t+i} + γ^K R_{t+K}: subtract the part beyond the horizon.
        beyond_BT = torch.zeros_like(R_BT)
        beyond_BT[:, : T - horizon] = R_BT[:, horizon:]
        R_BT = R_BT - discount**horizon * beyond_BT
    return R_BT


def future_returns(
    r_N: Tensor,
    row_index_N: Tensor,
    discount: float = 1.0,
    horizon: int | None = None,
    exclude_current: bool = False,
    length_norm: bool = False,
) -> Tensor:
    """(N,) returns of (N,) rewards within each sequence (rows from `row_index_N`).

    Args:
        discount, horizon: γ and K of `discounted_returns`.
        exclude_current: return R_{t+1} (the future after t) instead of R_t.
        length_norm: divide by the number of tokens the window sums (MiniLLM's R^norm);
          an empty window gives 0.
    """
    if r_N.shape[0] == 0:
        return r_N
    r_BT, mask_BT, index = pack_rows(r_N, row_index_N)
    R_BT = discounted_returns(r_BT, discount, horizon)
    count_BT = discounted_returns(mask_BT.to(r_BT.dtype), 1.0, horizon) if length_norm else None
    if exclude_current:
        R_BT = torch.cat([R_BT[:, 1:], torch.zeros_like(R_BT[:, :1])], dim=1)
        if count_BT is not None:
            count_BT = torch.cat([count_BT[:, 1:], torch.zeros_like(count_BT[:, :1])], dim=1)
    if count_BT is not None:
        R_BT = R_BT / count_BT.clamp_min(1.0)
    return R_BT[index]


def whiten(x_N: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / (std + eps) over the tokens of the micro-batch (0 for fewer than 2)."""
    if x_N.numel() < 2:
        return torch.zeros_like(x_N)
    return (x_N - x_N.mean()) / (x_N.std(unbiased=False) + eps)
