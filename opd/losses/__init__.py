"""Losses: pure functions, logits or hidden states in, per-token values out, never reduced.

divergences  forward_kl, reverse_kl, generalized_jsd, total_variation, skew KLs;
             the DIVERGENCES registry and divergence(name, ...)
akl          akl: head/tail-gap weighted forward + reverse KL (same registry)
adaptive     todi, entropy_aware, bridge, taid, topk_reverse_kl (same registry)
chunked      the same divergences from hidden states + lm_head, in row chunks
reduce       token_mean, sequence_mean
"""

# adaptive and akl are imported for their side effect too: they register in DIVERGENCES.
from opd.losses.adaptive import (
    bridge,
    entropy_aware,
    entropy_gate,
    taid,
    todi,
    todi_weights,
    topk_reverse_kl,
)
from opd.losses.akl import akl, akl_head_mask, akl_weights
from opd.losses.chunked import (
    chunked_divergence,
    chunked_token_logprobs,
    chunked_topk,
    token_logprobs,
)
from opd.losses.divergences import (
    DIVERGENCES,
    divergence,
    divergence_params,
    forward_kl,
    generalized_jsd,
    get_divergence,
    register_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from opd.losses.one_pass import chunked_weighted_divergence
from opd.losses.reduce import sequence_mean, token_mean

__all__ = [
    "DIVERGENCES",
    "akl",
    "akl_head_mask",
    "akl_weights",
    "bridge",
    "chunked_divergence",
    "chunked_weighted_divergence",
    "chunked_token_logprobs",
    "chunked_topk",
    "divergence",
    "divergence_params",
    "entropy_aware",
    "entropy_gate",
    "forward_kl",
    "generalized_jsd",
    "get_divergence",
    "register_divergence",
    "reverse_kl",
    "sequence_mean",
    "skew_forward_kl",
    "skew_reverse_kl",
    "taid",
    "todi",
    "todi_weights",
    "token_logprobs",
    "token_mean",
    "topk_reverse_kl",
    "total_variation",
]
