"""Token-level interleaved sampling: the student and the teacher decode side by side.

Three prefix sources share one per-token decoding loop (`decode`). It left-pads the prompts,
runs both models step by step with their KV caches, and lets a rule pick each next token from
the two next-token distributions q (student) and p (teacher):

- `token_mix(alpha, clip)`: MiniLLM's teacher-mixed sampling (Gu et al., ICLR 2024),

      y_t ~ p̃ = α·p + (1−α)·q,      w_t = q(y_t) / p̃(y_t)      (α = 0.2)

  w_t goes into `Rollout.token_weight_BT` (detached), so a signal averaged over these tokens
  estimates its average over student-written tokens. MiniLLM clips the PPO ratio that carries
  w_t to [1−ε, 1+ε] with ε = 0.2 (its `cliprange`); opd has no PPO ratio here, so `clip=ε`
  clamps w_t itself to [1−ε, 1+ε]; `clip=None` keeps the unbiased (higher-variance) weight.
  Written by "student".
- `speculative(k)`: SKD (Xu et al., ICLR 2025). The student proposes y'_t ~ q; it is kept if
  it is among the teacher's k most likely tokens at t (ranked on the raw teacher logits), else
  it is replaced by y_t ~ p. `rollout.info["student_share"]` is the fraction of kept tokens.
- `adaswitch(tau)`: AdaSwitch (Peng et al., 2025). The student proposes y'_t ~ q and
  d_t = −log p(y'_t) (default, p at temperature 1) or d_t = KL(p ‖ q) (`divergence=
  "forward_kl"`, AdaSwitch's metric). With s the first position where d_t > τ (or, with
  `scale`=K, d_t > K·mean(d_{t−window..t−1}), AdaSwitch's adaptive threshold):

      y_t = y'_t (student)  for t < s        y_t ~ p (teacher)  for t ≥ s

  i.e. the proposal that crossed the threshold is dropped and the teacher writes position s
  and everything after it (one switch per row). τ = inf is the student alone, τ = −inf the
  teacher from the first token. Written by "adaswitch"; `student_share` is logged.

Sampling: ctx.params' temperature, top-k and top-p warp each model's logits in the order and
with the semantics of Hugging Face `generate` (temperature, then top-k, then top-p); p and q
above are the warped distributions. Each draw is one `torch.multinomial` over the batch from
torch's global RNG, so a restored RNG state reproduces a rollout, and `token_mix(0)` writes
exactly the tokens `student()` writes with the same RNG (`token_mix(1)`: `teacher()`), given
the same warpers (note: `HFBackend` passes top_k=0 as None, which transformers turns into 50).
Temperature 0 is greedy: the argmax of each rule's distribution (token_mix: of
α·softmax(z_T) + (1−α)·softmax(z_S), whose weights are then computed at temperature 1).
Rows stop after their first stop token (kept) or max_new_tokens. Positions are the models'
default (0..L−1 over the padded row), as in transformers 5 `generate` and opd's scoring.
Both models' logits are cut to the shared vocabulary min(V_s, V_t).

Deviations:
- MiniLLM clips the ratio inside its PPO objective; opd clips the weight itself (above).
- SKD: none in the sampling rule (top-k on the teacher's logits, replacement drawn from the
  teacher at the sampling temperature).
- AdaSwitch: the default is the fixed-τ rule of METHODS.md §4 with d = −log p(y'_t). The
  paper's rule is d = KL(p ‖ q) against K·(mean of the last L values of d); use
  `divergence="forward_kl", tau=inf, scale=K, window=L`. Its K and L are not reproduced.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Sequence

import torch

from opd.errors import ConfigError
from opd.sampling.backends.base import GenerationParams
from opd.sampling.backends.hf import cut_at_stop, left_pad
from opd.sampling.sources import RolloutContext, make_rollout

Pick = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""pick(t, logits_s_BV, logits_t_BV) -> next token ids (B,); float32 logits, shared V."""


# ---------------------------------------------------------------------------------------------
# The shared loop.


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
def decode(ctx: RolloutContext, prompts: Sequence[Sequence[int]], pick: Pick) -> list[list[int]]:
    """Decode student and teacher side by side; `pick` chooses every token.

    Args:
      ctx: the rollout context (both models, pad and stop ids, generation params).
      prompts: B token lists (left-padded here).
      pick: `pick(t, logits_s_BV, logits_t_BV) -> ids_B` at each completion position t,
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
            next_B = pick(t, z_s[:, :V], z_t[:, :V].to(z_s.device)).cpu()
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


def _decode_with_records(ctx, prompts, pick, names) -> Decoded:
    log = {n: [] for n in names}  # name -> list over t of (B,) tensors

    def recording_pick(t, z_s, z_t):
        next_B, rec = pick(t, z_s, z_t)
        for n in names:
            log[n].append(rec[n].detach().float().cpu())
        return next_B

    comps = decode(ctx, prompts, recording_pick)
    records = {}
    for n, per_step in log.items():
        table = torch.stack(per_step, dim=1).tolist() if per_step else [[] for _ in comps]
        records[n] = [row[: len(c)] for row, c in zip(table, comps)]
    return Decoded(comps, records)


# ---------------------------------------------------------------------------------------------
# The three rules.


def mixture_decode(ctx, prompts, alpha: float, clip: float | None) -> Decoded:
    """MiniLLM teacher-mixed sampling; records the importance weight "weight" per token."""
    params = ctx.params

    def pick(t, z_s, z_t):
        q_BV, p_BV = sample_probs(z_s, params), sample_probs(z_t, params)
        mix_BV = alpha * p_BV + (1.0 - alpha) * q_BV  # α=0 is exactly q, α=1 exactly p
        y_B = draw(mix_BV, params.greedy)
        w_B = (q_BV.gather(1, y_B[:, None]) / mix_BV.gather(1, y_B[:, None])).squeeze(1)
        if clip is not None:
            w_B = w_B.clamp(1.0 - clip, 1.0 + clip)
        return y_B, {"weight": w_B}

    return _decode_with_records(ctx, prompts, pick, ("weight",))


def speculative_decode(ctx, prompts, k: int) -> Decoded:
    """SKD interleaved sampling; records "by_student" (1 = proposal kept) and "proposal"."""
    params = ctx.params

    def pick(t, z_s, z_t):
        proposal_B = draw(sample_probs(z_s, params), params.greedy)
        topk_BK = z_t.topk(min(k, z_t.shape[-1]), dim=-1).indices
        kept_B = (topk_BK == proposal_B[:, None]).any(dim=-1)
        y_B = proposal_B.clone()
        rejected = (~kept_B).nonzero().squeeze(1)
        if rejected.numel():
            y_B[rejected] = draw(sample_probs(z_t[rejected], params), params.greedy)
        return y_B, {"by_student": kept_B, "proposal": proposal_B}

    return _decode_with_records(ctx, prompts, pick, ("by_student", "proposal"))


def switch_decode(
    ctx,
    prompts,
    tau: float,
    divergence: str = "teacher_nll",
    scale: float | None = None,
    window: int = 8,
) -> Decoded:
    """AdaSwitch: student until d_t crosses the threshold, then the teacher (one switch).

    Records "by_student", "proposal" (the student's proposal y'_t) and "divergence" (d_t of
    the proposal while the row is still with the student, NaN after the switch).
    """
    params = ctx.params
    state = {"switched": None, "history": []}

    def pick(t, z_s, z_t):
        B = z_s.shape[0]
        if state["switched"] is None:
            state["switched"] = torch.zeros(B, dtype=torch.bool, device=z_s.device)
        before_B = state["switched"].clone()
        proposal_B = draw(sample_probs(z_s, params), params.greedy)
        logp_BV = z_t.log_softmax(dim=-1)
        if divergence == "teacher_nll":
            d_B = -logp_BV.gather(1, proposal_B[:, None]).squeeze(1)
        else:  # KL(p ‖ q) at temperature 1
            d_B = (logp_BV.exp() * (logp_BV - z_s.log_softmax(dim=-1))).sum(dim=-1)
        threshold_B = torch.full_like(d_B, tau)
        if scale is not None and state["history"]:
            recent_B = torch.stack(state["history"][-window:]).mean(dim=0)
            threshold_B = torch.minimum(threshold_B, scale * recent_B)
        state["history"].append(d_B)
        switched_B = before_B | (d_B > threshold_B)
        state["switched"] = switched_B
        y_B = proposal_B.clone()
        rows = switched_B.nonzero().squeeze(1)
        if rows.numel():
            y_B[rows] = draw(sample_probs(z_t[rows], params), params.greedy)
        d_rec = torch.where(before_B, torch.full_like(d_B, math.nan), d_B)
        return y_B, {"by_student": ~switched_B, "proposal": proposal_B, "divergence": d_rec}

    return _decode_with_records(ctx, prompts, pick, ("by_student", "proposal", "divergence"))


# ---------------------------------------------------------------------------------------------
# Prefix sources.


def _share(flags: list) -> float:
    n = sum(len(r) for r in flags)
    return sum(sum(r) for r in flags) / n if n else 0.0


def _prompts_answers(examples):
    return [ex.prompt_ids for ex in examples], [ex.answer for ex in examples]


@dataclass(frozen=True)
class TokenMix:
    """MiniLLM teacher-mixed sampling with importance weights (see the module docstring)."""

    alpha: float = 0.2
    clip: float | None = 0.2
    needs_completions: ClassVar[bool] = False
    needs_teacher_model: ClassVar[bool] = True

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"token_mix: 'alpha' must be in [0, 1], got {self.alpha}")
        if self.clip is not None and not 0.0 <= self.clip < 1.0:
            raise ConfigError(f"token_mix: 'clip' must be None or in [0, 1), got {self.clip}")

    def rollout(self, examples, ctx: RolloutContext):
        prompts, answers = _prompts_answers(examples)
        dec = mixture_decode(ctx, prompts, self.alpha, self.clip)
        weights = dec.records["weight"]
        n = sum(len(w) for w in weights)
        info = {"mean_token_weight": sum(map(sum, weights)) / n if n else 1.0}
        ro = make_rollout(prompts, dec.completions, ctx.pad_id, "student", answers, info)
        w_BT = torch.ones(ro.completion_mask_BT.shape, dtype=torch.float32)
        for i, w in enumerate(weights):
            w_BT[i, : len(w)] = torch.tensor(w, dtype=torch.float32)
        return replace(ro, token_weight_BT=w_BT)

    def describe(self) -> str:
        clip = (
            f", weights clipped to [{1 - self.clip:g}, {1 + self.clip:g}]"
            if self.clip is not None
            else ""
        )
        return f"token_mix: y_t ~ {self.alpha}·p_teacher + {1 - self.alpha:g}·q_student{clip}"


@dataclass(frozen=True)
class Speculative:
    """SKD: student proposals kept if in the teacher's top-k, else teacher samples."""

    k: int = 25
    needs_completions: ClassVar[bool] = False
    needs_teacher_model: ClassVar[bool] = True

    def __post_init__(self):
        if int(self.k) != self.k or self.k < 1:
            raise ConfigError(f"speculative: 'k' must be a positive integer, got {self.k}")

    def rollout(self, examples, ctx: RolloutContext):
        prompts, answers = _prompts_answers(examples)
        dec = speculative_decode(ctx, prompts, int(self.k))
        info = {"student_share": _share(dec.records["by_student"])}
        return make_rollout(prompts, dec.completions, ctx.pad_id, "speculative", answers, info)

    def describe(self) -> str:
        return f"speculative: student proposes, kept if in the teacher's top-{self.k}, else a teacher sample"


DIVERGENCES = ("teacher_nll", "forward_kl")


@dataclass(frozen=True)
class AdaSwitch:
    """AdaSwitch: the student writes until d_t > τ, the teacher writes the rest."""

    tau: float = 3.0  # −log p > 3 means the teacher gives the student's token under e^−3 ≈ 5 %
    divergence: str = "teacher_nll"
    scale: float | None = None
    window: int = 8
    needs_completions: ClassVar[bool] = False
    needs_teacher_model: ClassVar[bool] = True

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ConfigError(
                f"adaswitch: 'divergence' must be one of {DIVERGENCES}, got {self.divergence!r}"
            )
        if math.isnan(self.tau):
            raise ConfigError("adaswitch: 'tau' must be a number (inf and -inf allowed), got nan")
        if self.scale is not None and not self.scale > 0:
            raise ConfigError(f"adaswitch: 'scale' (K) must be > 0 or None, got {self.scale}")
        if self.window < 1:
            raise ConfigError(f"adaswitch: 'window' must be >= 1, got {self.window}")

    def rollout(self, examples, ctx: RolloutContext):
        prompts, answers = _prompts_answers(examples)
        dec = switch_decode(ctx, prompts, float(self.tau), self.divergence, self.scale, self.window)
        by_student = dec.records["by_student"]
        info = {
            "student_share": _share(by_student),
            "switched_rows": sum(1 for r in by_student if r and not r[-1])
            / max(1, len(by_student)),
        }
        return make_rollout(prompts, dec.completions, ctx.pad_id, "adaswitch", answers, info)

    def describe(self) -> str:
        rule = f"d_t > {self.tau}"
        if self.scale is not None:
            rule += f" or d_t > {self.scale}·mean(last {self.window} d)"
        return f"adaswitch: student writes until {rule} (d = {self.divergence}), then the teacher"


def token_mix(alpha: float = 0.2, clip: float | None = 0.2) -> TokenMix:
    return TokenMix(alpha=alpha, clip=clip)


def speculative(k: int = 25) -> Speculative:
    return Speculative(k=k)


def adaswitch(
    tau: float = 3.0, divergence: str = "teacher_nll", scale: float | None = None, window: int = 8
) -> AdaSwitch:
    return AdaSwitch(tau=tau, divergence=divergence, scale=scale, window=window)
