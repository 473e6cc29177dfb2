"""Signals: the per-token quantity the student minimises on the rollout.

A signal maps (student rows, teacher scores, context) to a per-token tensor (N,), never
reduced; the loop multiplies it by the token weights and reduces it (docs/methods.md §1–5).

    divergence.py       `Divergence`: any full-vocabulary divergence of `opd.losses`
    topk.py             `TopKDivergence`: a divergence on the teacher's top-k + tail buckets
    policy_gradient.py  sampled-token and sequence-level surrogates: `SampledRKL`, `GOPD`,
                        `MiniLLMPolicyGradient`, `Ketchup`, `Reopold`, `RewardWeighted`
    tokens.py           their per-token inputs (log q(y_t), log p(y_t), entropies, returns)
    combinators.py      `ByProgress`, `ByWriter`, `Paired`, `two_stage_kl`, `prefix_source`
    schedules.py        `Linear` and parameter resolution; `requirements`, `leaf_parts`,
                        `logged_names`

Every signal has `requires` (a frozenset of teacher outputs: "full_logits", "topk_logprobs",
"token_logprobs"), `__call__(student, teacher, ctx) -> (N,)` and `describe()`; the interface
is `opd.parts.Signal`. The context `ctx` is `opd.context.StepContext`.
"""

from opd.signals.combinators import (
    PREFIX_SOURCES,
    ByProgress,
    ByWriter,
    Paired,
    prefix_source,
    two_stage_kl,
)
from opd.signals.divergence import Divergence
from opd.signals.policy_gradient import (
    GOPD,
    Ketchup,
    MiniLLMPolicyGradient,
    Reopold,
    RewardWeighted,
    SampledRKL,
)
from opd.signals.schedules import (
    Linear,
    leaf_parts,
    logged_names,
    requirements,
    resolve,
    resolve_params,
)
from opd.signals.topk import TopKDivergence

__all__ = [
    "GOPD",
    "PREFIX_SOURCES",
    "ByProgress",
    "ByWriter",
    "Divergence",
    "Ketchup",
    "Linear",
    "MiniLLMPolicyGradient",
    "Paired",
    "Reopold",
    "RewardWeighted",
    "SampledRKL",
    "TopKDivergence",
    "leaf_parts",
    "logged_names",
    "prefix_source",
    "requirements",
    "resolve",
    "resolve_params",
    "two_stage_kl",
]
