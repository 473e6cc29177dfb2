"""Token-level interleaved decoding: the student and the teacher decode side by side.

`decode` left-pads the prompts, runs both models step by step with their KV caches, and lets
a rule `pick(logits_s_BV, logits_t_BV)` choose each next token from the two next-token
distributions q (student) and p (teacher). The rules built on it are the prefix sources
`token_mix` and `speculative` (`opd.sampling.token_level`) and `adaswitch`
(`opd.sampling.adaswitch`); `decode_with_records` also keeps per-token records of the rule
(importance weights, who wrote the token, the switch statistic).

Sampling: ctx.params' temperature, top-k and top-p warp each model's logits in the order and
with the semantics of Hugging Face `generate` (temperature, then top-k, then top-p); p and q
are the warped distributions. Each draw is one `torch.multinomial` over the batch from
torch's global RNG, so a restored RNG state reproduces a rollout, and `token_mix(0)` writes
exactly the tokens `student()` writes with the same RNG (`token_mix(1)`: `teacher()`), given
the same warpers (note: `HFBackend` passes top_k=0 as None, which transformers turns into 50).
Temperature 0 is greedy: the argmax of each rule's distribution.
Rows stop after their first stop token (kept) or max_new_tokens. Positions are the models'
default (0..L−1 over the padded row), as in transformers 5 `generate` and opd's scoring.
Both models' logits are cut to the shared vocabulary min(V_s, V_t).
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from opd.context import StepContext
from opd.errors import ConfigError
from opd.sampling.backends.base import GenerationParams
from opd.sampling.backends.hf import cut_at_stop, left_pad

Pick = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""pick(logits_s_BV, logits_t_BV) -> next token ids (B,); float32 logits, shared V. A rule
that depends on the position keeps its own state (called once per position, in order)."""


def warp(logits_BV: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """Sampling scores from logits: temperature, then top-k, then top-p (as HF `generate`).

    Args:
      logits_BV: (B, V) float32 next-token logits.
      params: temperature (> 0 here), top_k (0 = off), top_p (1.0 = off).

    Returns:
      (B, V) scores; filtered entries are −inf. softmax(scores) is the sampling distribution.
    """
    s_BV = logits_BV / params.temperature if params.temperature != 1.0 else logits_BV
    if params.top_k > 0:
        kth_B1 = torch.topk(s_BV, min(params.top_k, s_BV.shape[-1]))[0][..., -1, None]
        s_BV = s_BV.masked_fill(s_BV < kth_B1, -math.inf)
    if params.top_p < 1.0:
        sorted_BV, order_BV = torch.sort(s_BV, descending=False)
        drop_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1) <= (1 - params.top_p)
        drop_BV[..., -1:] = False  # always keep the most likely token
        s_BV = s_BV.masked_fill(drop_BV.scatter(1, order_BV, drop_BV), -math.inf)
    return s_BV


def draw(probs_BV: torch.Tensor, greedy: bool) -> torch.Tensor:
    """(B,) token ids: argmax if greedy, else one multinomial draw per row (global RNG)."""
    if greedy:
        return probs_BV.argmax(dim=-1)
    return torch.multinomial(probs_BV, num_samples=1).squeeze(1)


def sample_probs(logits_BV: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """The distribution a model samples from: softmax of the warped logits (T=1 if greedy)."""
    return (logits_BV if params.greedy else warp(logits_BV, params)).softmax(dim=-1)


class _Incremental:
    """One model decoding step by step with its KV cache."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.key = "cache" if "cache" in params else "past_key_values"  # transformers 5 / 4
        self.device = next(model.parameters()).device
        self.cache = None

    def step(self, ids_BS: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        """Feed new tokens (B, S); return the float32 logits that predict the next one (B, V)."""
        out = self.model(
            input_ids=ids_BS.to(self.device),
            attention_mask=mask_BL.to(self.device),
            use_cache=True,
            **{self.key: self.cache},
        )
        self.cache = getattr(out, self.key)
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)


@contextmanager
def _eval_mode(*models):
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, w in zip(models, was):
            m.train(w)


@torch.no_grad()
def decode(ctx: StepContext, prompts: Sequence[Sequence[int]], pick: Pick) -> list[list[int]]:
    """Decode student and teacher side by side; `pick` chooses every token.

    Args:
      ctx: the rollout context (both models, pad and stop ids, generation params).
      prompts: B token lists (left-padded here).
      pick: `pick(logits_s_BV, logits_t_BV) -> ids_B` at each completion position t, in order,
        with both models' next-token logits given the same prefix (float32, shared V).

    Returns:
      B completions, each cut after its first stop token (or max_new_tokens long). `pick` is
      called for every row until all rows stopped; rows already stopped get the pad id.
    """
    if ctx.teacher is None:
        raise ConfigError("token-level samplers need a local teacher model (white-box access)")
    if not prompts:
        return []
    ids_BP, mask_BL = left_pad(prompts, ctx.pad_id)
    B = ids_BP.shape[0]
    student, teacher = _Incremental(ctx.student), _Incremental(ctx.teacher)
    stops = torch.tensor(list(ctx.stop_ids), dtype=torch.long)
    done_B = torch.zeros(B, dtype=torch.bool)
    steps: list[torch.Tensor] = []
    with _eval_mode(ctx.student, ctx.teacher):
        z_s, z_t = student.step(ids_BP, mask_BL), teacher.step(ids_BP, mask_BL)
        for t in range(ctx.params.max_new_tokens):
            V = min(z_s.shape[-1], z_t.shape[-1])
            next_B = pick(z_s[:, :V], z_t[:, :V].to(z_s.device)).cpu()
            next_B = torch.where(done_B, torch.full_like(next_B, ctx.pad_id), next_B)
            steps.append(next_B)
            done_B |= torch.isin(next_B, stops)
            if bool(done_B.all()) or t + 1 == ctx.params.max_new_tokens:
                break
            mask_BL = torch.cat([mask_BL, torch.ones(B, 1, dtype=mask_BL.dtype)], dim=1)
            z_s, z_t = (
                student.step(next_B[:, None], mask_BL),
                teacher.step(next_B[:, None], mask_BL),
            )
    if not steps:
        return [[] for _ in range(B)]
    rows = torch.stack(steps, dim=1).tolist()
    return [cut_at_stop(row, ctx.stop_ids) for row in rows]


@dataclass(frozen=True)
class Decoded:
    """Completions plus per-token records of the rule (each row cut to its completion).

    Attributes:
      completions: B token lists.
      records: name -> B lists of floats, one per completion token (e.g. "weight",
        "by_student", "proposal", "divergence").
    """

    completions: list
    records: dict


def decode_with_records(ctx, prompts, pick, names) -> Decoded:
    log = {n: [] for n in names}  # name -> list over t of (B,) tensors

    def recording_pick(z_s, z_t):
        next_B, rec = pick(z_s, z_t)
        for n in names:
            log[n].append(rec[n].detach().float().cpu())
        return next_B

    comps = decode(ctx, prompts, recording_pick)
    records = {}
    for n, per_step in log.items():
        table = torch.stack(per_step, dim=1).tolist() if per_step else [[] for _ in comps]
        records[n] = [row[: len(c)] for row, c in zip(table, comps)]
    return Decoded(comps, records)


def share(flags: list) -> float:
    """The fraction of true flags over all rows' tokens (0 for no tokens)."""
    n = sum(len(r) for r in flags)
    return sum(sum(r) for r in flags) / n if n else 0.0
