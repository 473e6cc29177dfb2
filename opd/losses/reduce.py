"""Reductions of per-token values to a scalar loss.

Losses in `opd.losses` never reduce; the caller picks one of these:

    token_mean     Σ_t mask_t · v_t / max(Σ_t mask_t, 1)       every counted token weighs the same
    sequence_mean  mean over sequences of each one's masked token mean (long and short
                   completions weigh the same; sequences with no counted token are skipped)

The guard max(·, 1) makes an all-masked batch give 0 rather than 0/0 = NaN.
"""

from __future__ import annotations

from torch import Tensor


def _check(values: Tensor, mask: Tensor) -> None:
    if values.shape != mask.shape:
        raise ValueError(
            f"values shape {tuple(values.shape)} != mask shape {tuple(mask.shape)}; they must match"
        )


def token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Masked mean over all tokens: Σ mask·values / max(Σ mask, 1).

    Args:
        values: (...) per-token values, e.g. (B, T) or (N,).
        mask: same shape, bool or 0/1 (fractional weights also work); 0 drops a token.

    Returns:
        0-d tensor; 0 when no token is counted.
    """
    _check(values, mask)
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def sequence_mean(values_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean over sequences of each sequence's masked token mean.

    Args:
        values_BT: (B, T) per-token values.
        mask_BT: (B, T) bool or 0/1 mask; 0 drops a token.

    Returns:
        0-d tensor: mean over the sequences with at least one counted token of
        Σ_t mask·values / Σ_t mask; 0 when no sequence has one.
    """
    _check(values_BT, mask_BT)
    if values_BT.dim() != 2:
        raise ValueError(f"values_BT must be (B, T), got shape {tuple(values_BT.shape)}")
    mask_BT = mask_BT.to(values_BT.dtype)
    count_B = mask_BT.sum(-1)  # (B,)
    mean_B = (values_BT * mask_BT).sum(-1) / count_B.clamp_min(1.0)  # (B,)
    has_tokens_B = (count_B > 0).to(values_BT.dtype)
    return (mean_B * has_tokens_B).sum() / has_tokens_B.sum().clamp_min(1.0)
