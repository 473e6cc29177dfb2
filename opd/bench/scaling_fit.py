"""The scaling-law fit: L(N, C) = E + A·N^(−α) + B·C^(−β), least squares in log space.

The survey's equation 37 conjectures that the on-policy distillation loss is a joint power
law in student size N_S, teacher size N_T and compute, plus an irreducible term E (the task's
entropy) and a term for the capacity-gap interference between student and teacher. (The
stored text of the survey lost the equation's symbols; its prose names these terms.) What we
fit, and why it deviates:

    L(N, C) = E + A · N^(−α) + B · C^(−β)                           (always)
    L(N, C, g) = E + A · N^(−α) + B · C^(−β) + G · g^(γ)             (with `gap=`)

N = the student's parameters without the input embedding (`opd.bench.flops.flop_params`),
C = the estimated FLOPs spent (`opd.bench.flops`), g = N_T / N_S. With a single teacher the
gap term is not identifiable: log g = log N_T − log N is an affine function of log N, so
G·g^γ = G·N_T^γ·N^(−γ) has the student term's shape. `fit_law` refuses such a covariate with
a clear error rather than returning meaningless numbers; the teacher term B_T·N_T^(−β_T) is
a constant with one teacher and is absorbed into E.

Estimator (as Hoffmann et al. 2022, without their Huber loss): with E = e^e, A = e^a, B = e^b
(so all three are positive),

    log L̂ = logsumexp(a − α·log N, b − β·log C, e),    minimise Σ_cells (log L − log L̂)²

by Levenberg–Marquardt from a grid of starting exponents (for each, E, A, B start from a
non-negative linear least-squares fit in L-space). log N and log C are centred at their
geometric means N₀, C₀ for conditioning; A and B are reported in raw units
(A = A₀ · N₀^α). R² is in log space. Confidence intervals: case bootstrap over cells
(resample cells with replacement, refit, 2.5 / 97.5 % percentiles); resamples with fewer
than 3 distinct sizes, 2 distinct budgets or 6 distinct cells are redrawn and counted.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from opd.errors import ConfigError

MIN_SIZES = 4
"""Fewer distinct student sizes than this cannot pin down α next to E (the brief's floor)."""


@dataclass
class Fit:
    """A fitted law; `params` in raw units, `ci` = {name: (lo, hi)} after `bootstrap`."""

    params: dict
    r2: float
    residuals: list  # log L − log L̂ per cell, in the input order
    names: tuple
    ci: dict = field(default_factory=dict)
    boot_ok: int = 0
    boot_redrawn: int = 0

    def predict(self, n, c, gap=None) -> np.ndarray:
        p = self.params
        out = p["E"] + p["A"] * np.asarray(n, float) ** -p["alpha"]
        out = out + p["B"] * np.asarray(c, float) ** -p["beta"]
        if "G" in p:
            out = out + p["G"] * np.asarray(gap, float) ** p["gamma"]
        return out


def _model(theta: np.ndarray, X: np.ndarray):
    """log L̂ and its Jacobian. theta = (e, a, α, b, β[, g, γ]); X columns: log N, log C[, log g]."""
    u = [np.full(len(X), theta[0]), theta[1] - theta[2] * X[:, 0], theta[3] - theta[4] * X[:, 1]]
    if len(theta) == 7:
        u.append(theta[5] + theta[6] * X[:, 2])
    U = np.stack(u, axis=1)
    m = U.max(axis=1, keepdims=True)
    w = np.exp(U - m)
    f = m[:, 0] + np.log(w.sum(axis=1))
    w = w / w.sum(axis=1, keepdims=True)  # ∂f/∂u_k: softmax weights
    cols = [w[:, 0], w[:, 1], -w[:, 1] * X[:, 0], w[:, 2], -w[:, 2] * X[:, 1]]
    if len(theta) == 7:
        cols += [w[:, 3], w[:, 3] * X[:, 2]]
    return f, np.stack(cols, axis=1)


def _lm(theta: np.ndarray, X: np.ndarray, y: np.ndarray, iters: int = 200):
    """Levenberg–Marquardt on Σ (y − f(θ))²; returns (θ, sum of squares)."""
    lam = 1e-2
    f, J = _model(theta, X)
    sse = float(((y - f) ** 2).sum())
    for _ in range(iters):
        r = y - f
        H = J.T @ J
        step = np.linalg.solve(H + lam * np.diag(np.diag(H) + 1e-9), J.T @ r)
        cand = theta + step
        f2, J2 = _model(cand, X)
        sse2 = float(((y - f2) ** 2).sum())
        if np.isfinite(sse2) and sse2 < sse:
            done = sse - sse2 < 1e-12 * (1 + sse)
            theta, f, J, sse, lam = cand, f2, J2, sse2, max(lam / 3, 1e-9)
            if done:
                break
        else:
            lam *= 4
            if lam > 1e8:
                break
    return theta, sse


def _start(alpha: float, beta: float, X: np.ndarray, L: np.ndarray, gamma=None):
    """E, A, B (, G) ≥ 0 by linear least squares in L-space at fixed exponents, as logs."""
    cols = [np.ones(len(X)), np.exp(-alpha * X[:, 0]), np.exp(-beta * X[:, 1])]
    if gamma is not None:
        cols.append(np.exp(gamma * X[:, 2]))
    M = np.stack(cols, axis=1)
    coef = np.clip(np.linalg.lstsq(M, L, rcond=None)[0], 1e-3 * L.min(), None)
    theta = [math.log(coef[0]), math.log(coef[1]), alpha, math.log(coef[2]), beta]
    if gamma is not None:
        theta += [math.log(coef[3]), gamma]
    return np.array(theta)


def _check(n, c, loss, gap):
    n, c, loss = (np.asarray(v, float).ravel() for v in (n, c, loss))
    if not (len(n) == len(c) == len(loss)):
        raise ConfigError(
            f"fit_law: sizes, compute and loss differ in length ({len(n)}, {len(c)}, {len(loss)})"
        )
    for name, v in (("student size", n), ("compute", c), ("loss", loss)):
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            raise ConfigError(
                f"fit_law: every {name} must be a finite number > 0 "
                f"(log-space fit); got {v.tolist()}"
            )
    sizes = len(np.unique(n))
    if sizes < MIN_SIZES:
        raise ConfigError(
            f"fit_law: need at least {MIN_SIZES} distinct student sizes to fit "
            f"L = E + A·N^-alpha + B·C^-beta, got {sizes}; add sizes to the grid"
        )
    if len(np.unique(c)) < 3:
        raise ConfigError(
            "fit_law: need at least 3 distinct compute values to fit the "
            f"compute exponent beta, got {len(np.unique(c))}"
        )
    if gap is not None:
        g = np.asarray(gap, float).ravel()
        if len(g) != len(n) or np.any(~np.isfinite(g)) or np.any(g <= 0):
            raise ConfigError("fit_law: gap must be one finite ratio N_T/N_S > 0 per cell")
        D = np.stack([np.ones_like(n), np.log(n), np.log(g)], axis=1)
        if np.linalg.matrix_rank(D, tol=1e-6 * np.abs(D).max()) < 3:
            raise ConfigError(
                "fit_law: the teacher–student gap N_T/N_S is a function of the "
                "student size alone (one teacher), so its term is not "
                "identifiable; vary the teacher size or drop gap="
            )
    return n, c, loss


def fit_law(n, c, loss, gap=None, *, alphas=None, betas=None) -> Fit:
    """Fit L = E + A·N^(−α) + B·C^(−β) (+ G·gap^γ) to cells; see the module docstring."""
    n, c, loss = _check(n, c, loss, gap)
    grid = (0.1, 0.3, 0.6, 1.0, 2.0)
    return _fit_core(n, c, loss, gap, alphas or grid, betas or grid, (0.3, 1.0))


def _fit_core(n, c, loss, gap, alphas, betas, gammas) -> Fit:
    """The best Levenberg–Marquardt fit over a grid of starting exponents (no input checks)."""
    n0, c0 = math.exp(np.log(n).mean()), math.exp(np.log(c).mean())
    cols = [np.log(n / n0), np.log(c / c0)]
    g0 = None
    if gap is not None:
        gap = np.asarray(gap, float).ravel()
        g0 = math.exp(np.log(gap).mean())
        cols.append(np.log(gap / g0))
    X, y = np.stack(cols, axis=1), np.log(loss)
    best = None
    for a0, b0, g_0 in itertools.product(alphas, betas, gammas if gap is not None else (None,)):
        theta, sse = _lm(_start(a0, b0, X, loss, g_0), X, y)
        if np.isfinite(sse) and (best is None or sse < best[1]):
            best = (theta, sse)
    if best is None:
        raise ValueError("no finite fit")
    return _result(best[0], X, y, n0, c0, g0)


def _exp(x: float) -> float:
    """exp without overflow (a runaway bootstrap resample reports inf, not a warning)."""
    return math.exp(x) if x < 700 else math.inf


def _result(theta, X, y, n0, c0, g0) -> Fit:
    f, _ = _model(theta, X)
    resid = y - f
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    e, a, alpha, b, beta = theta[:5]
    params = {
        "E": math.exp(e),
        "A": _exp(a + alpha * math.log(n0)),
        "alpha": float(alpha),
        "B": _exp(b + beta * math.log(c0)),
        "beta": float(beta),
    }
    names = ("E", "A", "alpha", "B", "beta")
    if len(theta) == 7:
        params["G"], params["gamma"] = _exp(theta[5] - theta[6] * math.log(g0)), float(theta[6])
        names += ("G", "gamma")
    return Fit(params=params, r2=r2, residuals=resid.tolist(), names=names)


def bootstrap(
    n, c, loss, fit: Fit, *, resamples: int = 200, seed: int = 0, gap=None, level: float = 0.95
) -> Fit:
    """Case bootstrap over cells: percentile CIs for every parameter, stored on `fit`."""
    n, c, loss = _check(n, c, loss, gap)
    rng = np.random.default_rng(seed)
    draws, redrawn = [], 0
    start = fit.params
    alphas, betas = (start["alpha"],), (start["beta"],)  # warm start: one LM run each
    while len(draws) < resamples:
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(n[idx])) < 3 or len(np.unique(c[idx])) < 2 or len(np.unique(idx)) < 6:
            redrawn += 1
            if redrawn > 50 * resamples:
                raise ConfigError(
                    "bootstrap: too few cells to resample (need ≥ 6 cells over "
                    "≥ 3 sizes and ≥ 2 budgets per resample)"
                )
            continue
        try:
            g = None if gap is None else np.asarray(gap, float).ravel()[idx]
            one = _fit_core(n[idx], c[idx], loss[idx], g, alphas, betas, (1.0,))
        except (np.linalg.LinAlgError, ValueError):
            redrawn += 1
            continue
        draws.append([one.params[k] for k in fit.names])
    D = np.array(draws)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    # "nearest": a runaway resample (A = inf) must not turn a bound into inf − inf = nan.
    pct = lambda col, q: float(np.percentile(col, q, method="nearest"))  # noqa: E731
    fit.ci = {k: (pct(D[:, i], lo), pct(D[:, i], hi)) for i, k in enumerate(fit.names)}
    fit.boot_ok, fit.boot_redrawn = len(draws), redrawn
    return fit
