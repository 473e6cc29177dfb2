"""Per-row sampling generators: a row's completion that does not depend on its batch.

The training step (`opd.step`, `opd.distributed.shard_rows`) gives each rollout row a seed
derived from (train.seed, step, global row index) and writes the rollout inside
`row_seeds(seeds)`. While that is active, a backend asked for exactly that many completions
draws row b's tokens from its own `torch.Generator(seed_b)`:

    next_b = multinomial(softmax(warp(logits_b)), 1, generator=g_b)     one draw per row

so the same row gets the same tokens whether it is decoded in a batch of 2 or of 8, in one
process or split over several, and the generation leaves the global torch RNG as it was:
the per-batch coins that still come from it (e.g. GKD's mixture, drawn inside the rollout
and advancing it as usual) are then drawn identically in every process. Without `row_seeds` (or
when the count differs, e.g. a source generating for a subset) the backends draw one
`torch.multinomial` over the batch from the global RNG, as before.

With Hugging Face `generate` (`HFBackend`) the draw is made by a logits processor
(`RowSampler`) that applies the same warpers and returns scores that are 0 at the drawn token
and −inf elsewhere; `generate`'s own warpers and multinomial then keep that token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextvars import ContextVar

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

_SEEDS: ContextVar[tuple[int, ...] | None] = ContextVar("opd_row_seeds", default=None)


@contextlib.contextmanager
def row_seeds(seeds: Sequence[int] | None):
    """Within: completions of len(seeds) prompts draw row b from a generator seeded seeds[b]
    (None: no change)."""
    if seeds is None:
        yield
        return
    token = _SEEDS.set(tuple(int(s) for s in seeds))
    try:
        yield
    finally:
        _SEEDS.reset(token)


def keep_global_rng():
    """A context that restores the global torch RNG (CPU and the current CUDA device) on
    exit: around `generate`, whose multinomial draws from it even when `RowSampler` has
    already fixed each row's token."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def current_row_seeds(n: int) -> tuple[int, ...] | None:
    """The active per-row seeds when there are exactly `n` (a backend asked for n
    completions), else None. An engine with per-request seeds (vLLM's `SamplingParams(seed=)`)
    can use them directly."""
    seeds = _SEEDS.get()
    return seeds if seeds is not None and len(seeds) == n else None


def row_generators(n: int, device) -> list[torch.Generator] | None:
    """One seeded generator per row when `row_seeds` holds exactly `n` seeds, else None."""
    seeds = current_row_seeds(n)
    if seeds is None:
        return None
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def draw(probs_BV: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """(B,) token ids: row b drawn from probs_BV[b] with gens[b]."""
    return torch.cat([torch.multinomial(probs_BV[b], 1, generator=g) for b, g in enumerate(gens)])


def warpers(params) -> LogitsProcessorList:
    """transformers' warpers in `generate`'s order: temperature, top-k, top-p."""
    out = LogitsProcessorList()
    if params.greedy:
        return out
    if params.temperature != 1.0:
        out.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        out.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        out.append(TopPLogitsWarper(params.top_p))
    return out


class RowSampler(LogitsProcessor):
    """A `generate` logits processor that draws each row's token with its own generator and
    returns 0 there and −inf elsewhere (what any warper and the multinomial then keep)."""

    def __init__(self, gens: Sequence[torch.Generator], params):
        self.gens, self.warp = list(gens), warpers(params)

    def __call__(self, input_ids, scores_BV):
        warped = self.warp(input_ids, scores_BV.float()) if self.warp else scores_BV.float()
        next_B = draw(warped.softmax(-1), self.gens)
        out = torch.full_like(scores_BV, float("-inf"))
        return out.scatter_(1, next_B[:, None], 0.0)
