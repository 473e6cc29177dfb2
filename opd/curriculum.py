"""Curricula: which prompts the student sees over training (a prompt selector).

- `Paced(a, b, n, pool, refresh_every)`: PACED's pass-rate curriculum (Xu et al., "PACED:
  Distillation and On-Policy Self-Distillation at the Frontier of Student Competence", arXiv
  2603.11178, 2026). Each candidate prompt gets a student pass rate s from n student samples
  scored by the task's verifier, and the Beta-kernel weight

      w(s) = s^a · (1 − s)^b + floor          a = b = 1:  w = s(1 − s) + floor, peak ¼ at s = ½

  Batches are drawn from the candidate pool with probability ∝ w (with replacement).
- PACED's divergence schedule (FKL, then RKL) is `opd.signals.two_stage_kl`.

Deviations from PACED (its method section and code were not readable here; the abstract and
summaries were):

- PACED weights each problem's *loss* by w(p); we *sample* prompts ∝ w and leave the loss
  unweighted. In expectation over the draw the two give the same gradient up to a constant
  factor (Σ w / |pool|), and sampling spends no generation on prompts of weight ~0.
- `floor` (default 1e-3, i.e. 0.4 % of the a = b = 1 peak of ¼) keeps every prompt drawable,
  so an estimate of s = 0 or 1 that has gone stale can still be revisited; the paper has no
  floor (w(0) = w(1) = 0).
- Pass rates are re-estimated every `refresh_every` optimizer steps over a fresh pool of
  `pool` prompts taken from the data stream (so the stream position, checkpointed, advances
  by `pool` prompts per refresh); between refreshes the estimates are stale. The paper
  estimates pass rates from student rollouts; its refresh rule is not verified.
- Estimation samples at `temperature` (default 1.0) regardless of the run's sampling
  temperature: greedy completions would make every s 0 or 1.
- The paper's split point for the FKL → RKL schedule is not verified; `split` defaults to ½.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from opd.errors import ConfigError, DataError


def beta_kernel(s: torch.Tensor, a: float = 1.0, b: float = 1.0) -> torch.Tensor:
    """PACED's Beta kernel s^a · (1 − s)^b (unnormalised), elementwise.

    Args:
      s: pass rates in [0, 1].
      a, b: exponents ≥ 0; a = b = 1 peaks at s = ½ with value ¼, and is 0 at s = 0 and 1.

    Returns:
      the kernel values, same shape as `s` (0^0 = 1, so a = 0 keeps s = 0 at weight 1).
    """
    return s.pow(a) * (1 - s).pow(b)


class Paced:
    """A prompt selector concentrating training on prompts the student solves about half the time.

    `select(stream, ctx)` returns `stream.batch_size` examples. Every `refresh_every` steps it
    takes `pool` prompts from `stream`, samples `n` student completions for each (one batched
    generation of pool·n prompts), scores them with `ctx.verify(text, answer)` and stores the
    pass rates; in between, it draws from the current pool ∝ `beta_kernel(s, a, b) + floor`
    with torch's global RNG (restored on resume, so a resumed run draws the same batches).

    Args:
      a, b: Beta-kernel exponents ≥ 0 (weight on s and on 1 − s).
      n: student samples per prompt for the pass rate, ≥ 1 (s takes values k/n).
      pool: candidate prompts per refresh, ≥ 1.
      refresh_every: optimizer steps between pass-rate refreshes, ≥ 1.
      floor: weight added to every prompt, > 0.
      temperature: sampling temperature of the estimation rollouts, > 0.

    State (`state_dict`, JSON-serialisable): the pass rates by example source, the current
    pool (as example sources) and the step of the last refresh.
    """

    def __init__(
        self,
        a: float = 1.0,
        b: float = 1.0,
        n: int = 4,
        pool: int = 64,
        refresh_every: int = 10,
        floor: float = 1e-3,
        temperature: float = 1.0,
    ):
        if not (a >= 0 and b >= 0):
            raise ConfigError(f"Paced: a and b must be >= 0, got a={a}, b={b}")
        for name, value in (("n", n), ("pool", pool), ("refresh_every", refresh_every)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"Paced: {name} must be an integer >= 1, got {value!r}")
        if not floor > 0:
            raise ConfigError(f"Paced: floor must be > 0, got {floor}")
        if not temperature > 0:
            raise ConfigError(
                f"Paced: temperature must be > 0 (greedy rollouts give s ∈ {{0, 1}}), got {temperature}"
            )
        self.a, self.b, self.n, self.pool = float(a), float(b), n, pool
        self.refresh_every, self.floor, self.temperature = (
            refresh_every,
            float(floor),
            float(temperature),
        )
        self.rates: dict[str, float] = {}  # example source -> latest pass-rate estimate
        self.pool_sources: list[str] = []
        self.last_refresh: int | None = None
        self._pool: list = []  # the Examples of pool_sources (rebuilt from the stream on resume)

    # --- weights ---------------------------------------------------------------------------
    def weight(self, rates: torch.Tensor) -> torch.Tensor:
        """w(s) = s^a (1 − s)^b + floor for pass rates `rates` (float64)."""
        return beta_kernel(rates.to(torch.float64), self.a, self.b) + self.floor

    def pool_weights(self) -> torch.Tensor:
        """(len(pool),) float64 weights of the current pool, in pool order."""
        rates = torch.tensor([self.rates[s] for s in self.pool_sources], dtype=torch.float64)
        return self.weight(rates)

    # --- pass rates ------------------------------------------------------------------------
    @torch.no_grad()
    def estimate(self, examples, ctx) -> list[float]:
        """Student pass rate of each example: the share of `n` samples the verifier accepts."""
        missing = [ex.source for ex in examples if ex.answer is None]
        if missing:
            raise DataError(
                f"PACED needs an 'answer' field in every row to measure pass rates; "
                f"{missing[0]} has none (add answers, or use a recipe without a curriculum)"
            )
        if ctx.verify is None or ctx.tokenizer is None:
            raise ConfigError("PACED needs a verifier and a tokenizer in the rollout context")
        prompts = [ex.prompt_ids for ex in examples for _ in range(self.n)]
        params = dataclasses.replace(ctx.params, temperature=self.temperature)
        completions = ctx.backend.generate(
            ctx.student, prompts, params, pad_id=ctx.pad_id, stop_ids=ctx.stop_ids
        )
        rates = []
        for i, ex in enumerate(examples):
            texts = [
                ctx.tokenizer.decode(c, skip_special_tokens=True)
                for c in completions[i * self.n : (i + 1) * self.n]
            ]
            rates.append(sum(bool(ctx.verify(t, ex.answer)) for t in texts) / self.n)
        return rates

    def refresh(self, stream, ctx) -> None:
        """Draw a new pool of `pool` prompts from the stream and estimate their pass rates."""
        drawn: list = []
        for _ in range(math.ceil(self.pool / stream.batch_size)):
            drawn += next(stream)
        unique = {ex.source: ex for ex in drawn[: self.pool]}  # a small set may repeat prompts
        self._pool = list(unique.values())
        self.pool_sources = list(unique)
        for ex, s in zip(self._pool, self.estimate(self._pool, ctx)):
            self.rates[ex.source] = s
        self.last_refresh = int(ctx.step)

    def _due(self, step: int) -> bool:
        return self.last_refresh is None or step - self.last_refresh >= self.refresh_every

    # --- the selector ------------------------------------------------------------------------
    def select(self, stream, ctx) -> list:
        """`stream.batch_size` examples drawn ∝ w(s) from the current pool (refreshed if due)."""
        if self._due(int(ctx.step)):
            self.refresh(stream, ctx)
        elif not self._pool:  # resumed: rebuild the pool's Examples from their sources
            by_source = {ex.source: ex for ex in stream.examples}
            self._pool = [by_source[s] for s in self.pool_sources]
        idx = torch.multinomial(self.pool_weights(), stream.batch_size, replacement=True)
        return [self._pool[i] for i in idx.tolist()]

    # --- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "rates": dict(self.rates),
            "pool": list(self.pool_sources),
            "last_refresh": self.last_refresh,
        }

    def load_state_dict(self, state: dict) -> None:
        self.rates = {str(k): float(v) for k, v in state.get("rates", {}).items()}
        self.pool_sources = [str(s) for s in state.get("pool", [])]
        missing = [s for s in self.pool_sources if s not in self.rates]
        if missing:
            raise ConfigError(f"Paced state: pool prompt {missing[0]!r} has no pass rate")
        last = state.get("last_refresh")
        self.last_refresh = None if last is None else int(last)
        self._pool = []

    def describe(self) -> str:
        return (
            f"PACED: sample prompts ∝ s^{self.a:g}(1−s)^{self.b:g} + {self.floor:g}, s = student "
            f"pass rate from {self.n} samples; pool {self.pool}, refreshed every "
            f"{self.refresh_every} steps"
        )
