"""Reductions of per-token values to a scalar loss, and their coefficients in closed form.

Losses in `opd.losses` never reduce; the caller picks one of these:

    token_mean     Σ_t mask_t · v_t / max(C, 1)        every counted token weighs the same;
                   C = Σ_t mask_t (this batch) or a given count (all micro-batches of a step)
    sequence_mean  Σ_b [L_b > 0] · (Σ_t mask_bt · v_bt / L_b) / max(S, 1), L_b = Σ_t mask_bt;
                   S = number of sequences with L_b > 0 (this batch) or a given count
                   (long and short completions weigh the same)

The guard max(·, 1) makes an all-masked batch give 0 rather than 0/0 = NaN.

Gradient accumulation: the optimizer step's loss is the reduction over all its micro-batches,
so the trainer counts C (or S) over every micro-batch of the step first (`step_count`) and
passes it to each micro-batch's reduction; the micro-batch losses then sum to the loss of one
batch holding all of them (what TRL does with `num_items_in_batch`).

Both reductions are linear in the values, so each token's coefficient c_bt = ∂loss/∂v_bt is
known before the values (`coefficients`):

    token_mean:     c_bt = mask_bt / max(C, 1)
    sequence_mean:  c_bt = mask_bt / (max(L_b, 1) · max(S, 1))

and reduce(values, mask) = Σ_bt c_bt · v_bt (tested against autograd on a zero probe).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

REDUCTIONS = ("token_mean", "sequence_mean")


def _check(values: Tensor, mask: Tensor) -> None:
    if values.shape != mask.shape:
        raise ValueError(
            f"values shape {tuple(values.shape)} != mask shape {tuple(mask.shape)}; they must match"
        )


def token_mean(values: Tensor, mask: Tensor, count: float | None = None) -> Tensor:
    """Masked mean over all tokens: Σ mask·values / max(count, 1).

    Args:
        values: (...) per-token values, e.g. (B, T) or (N,).
        mask: same shape, bool or 0/1 (fractional weights also work); 0 drops a token.
        count: the denominator; None = Σ mask (this batch's counted tokens).

    Returns:
        0-d tensor; 0 when no token is counted.
    """
    _check(values, mask)
    mask = mask.to(values.dtype)
    denom = mask.sum() if count is None else mask.new_tensor(float(count))
    return (values * mask).sum() / denom.clamp_min(1.0)


def sequence_mean(values_BT: Tensor, mask_BT: Tensor, count: float | None = None) -> Tensor:
    """Mean over sequences of each sequence's masked token mean.

    Args:
        values_BT: (B, T) per-token values.
        mask_BT: (B, T) bool or 0/1 mask; 0 drops a token.
        count: the number of sequences to divide by; None = those of this batch with at
            least one counted token.

    Returns:
        0-d tensor: Σ over sequences with a counted token of (Σ_t mask·values / Σ_t mask),
        divided by max(count, 1); 0 when no sequence has one.
    """
    _check(values_BT, mask_BT)
    if values_BT.dim() != 2:
        raise ValueError(f"values_BT must be (B, T), got shape {tuple(values_BT.shape)}")
    mask_BT = mask_BT.to(values_BT.dtype)
    count_B = mask_BT.sum(-1)  # (B,)
    mean_B = (values_BT * mask_BT).sum(-1) / count_B.clamp_min(1.0)  # (B,)
    has_tokens_B = (count_B > 0).to(values_BT.dtype)
    denom = has_tokens_B.sum() if count is None else mask_BT.new_tensor(float(count))
    return (mean_B * has_tokens_B).sum() / denom.clamp_min(1.0)


def coefficients(
    reduction: str, mask_BT: Tensor, count: float | None = None, dtype=torch.float32
) -> Tensor:
    """(B, T) coefficients c with reduce(values_BT, mask_BT, count) = Σ c ⊙ values_BT.

    Closed form (module docstring): token mean c = mask / max(C, 1); sequence mean
    c_bt = mask_bt / (max(L_b, 1) · max(S, 1)). Masked entries get 0.
    """
    mask = mask_BT.to(dtype)
    if reduction == "token_mean":
        denom = float(mask.sum()) if count is None else float(count)
        return mask / max(denom, 1.0)
    if reduction == "sequence_mean":
        len_B = mask.sum(-1)
        seqs = float((len_B > 0).sum()) if count is None else float(count)
        return mask / (len_B.clamp_min(1.0)[:, None] * max(seqs, 1.0))
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def step_count(reduction: str, masks_BT: Iterable[Tensor]) -> float:
    """The denominator of one optimizer step over all its micro-batches' masks.

    token_mean: all counted tokens; sequence_mean: all sequences with a counted token.
    """
    if reduction == "token_mean":
        return float(sum(float(m.to(torch.float64).sum()) for m in masks_BT))
    if reduction == "sequence_mean":
        return float(sum(int((m.to(torch.float64).sum(-1) > 0).sum()) for m in masks_BT))
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce(reduction: str, values_BT: Tensor, mask_BT: Tensor, count: float | None = None):
    """`token_mean` or `sequence_mean` by name."""
    if reduction == "token_mean":
        return token_mean(values_BT, mask_BT, count)
    if reduction == "sequence_mean":
        return sequence_mean(values_BT, mask_BT, count)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
