"""The scaling-law fit (synthetic data from a known law) and a tiny sweep end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from opd.bench import scaling, scaling_report
from opd.bench.scaling_fit import bootstrap, fit_law
from opd.errors import ConfigError
from opd.tasks.teacher import TeacherPreset

TRUTH = {"E": 0.05, "A": 30.0, "alpha": 0.5, "B": 2e4, "beta": 0.45}


def _grid(sizes=(5e3, 1.2e4, 3e4, 6e4, 1.3e5), budgets=(1e10, 3e10, 1e11, 3e11)):
    n = np.repeat(np.array(sizes, float), len(budgets))
    c = np.tile(np.array(budgets, float), len(sizes))
    return n, c


def _law(n, c, p=TRUTH):
    return p["E"] + p["A"] * n ** -p["alpha"] + p["B"] * c ** -p["beta"]


def test_fit_is_exact_on_noiseless_data():
    n, c = _grid()
    fit = fit_law(n, c, _law(n, c))
    for k, v in TRUTH.items():
        assert fit.params[k] == pytest.approx(v, rel=1e-3), k
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert max(abs(r) for r in fit.residuals) < 1e-6
    assert np.allclose(fit.predict(n, c), _law(n, c), rtol=1e-5)


def test_fit_recovers_exponents_from_noisy_data_and_the_bootstrap_ci_contains_them():
    n, c = _grid()
    rng = np.random.default_rng(3)
    loss = _law(n, c) * np.exp(rng.normal(0.0, 0.03, len(n)))  # 3 % multiplicative noise
    fit = bootstrap(n, c, loss, fit_law(n, c, loss), resamples=200, seed=1)
    assert fit.boot_ok == 200
    for k in ("alpha", "beta"):
        lo, hi = fit.ci[k]
        assert lo < TRUTH[k] < hi, (k, fit.ci[k])
        assert abs(fit.params[k] - TRUTH[k]) < 0.1, (k, fit.params[k])
        assert hi - lo < 0.5  # informative, not a CI that contains everything
    assert fit.r2 > 0.98
    # The residuals are the noise, in log space.
    assert np.std(fit.residuals) < 0.05


def test_a_wrong_exponent_is_outside_the_ci():
    n, c = _grid()
    rng = np.random.default_rng(4)
    loss = _law(n, c, {**TRUTH, "alpha": 1.0, "A": 3e3}) * np.exp(rng.normal(0.0, 0.02, len(n)))
    fit = bootstrap(n, c, loss, fit_law(n, c, loss), resamples=200, seed=2)
    lo, hi = fit.ci["alpha"]
    assert lo < 1.0 < hi and not lo < 0.5 < hi


def test_fewer_than_four_sizes_is_a_clear_error():
    n, c = _grid(sizes=(5e3, 3e4, 1.3e5))
    with pytest.raises(ConfigError, match="at least 4 distinct student sizes.*got 3"):
        fit_law(n, c, _law(n, c))
    with pytest.raises(ConfigError, match="loss must be a finite number > 0"):
        n4, c4 = _grid()
        fit_law(n4, c4, np.where(n4 > 1e5, 0.0, _law(n4, c4)))


def test_fewer_than_four_sizes_on_the_command_line_is_one_clean_error(capsys, tmp_path):
    code = scaling.main(["--hidden", "16", "32", "48", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("opd: error: --hidden") and "at least 4" in err[0]
    assert not (tmp_path / "x").exists()  # nothing started


def test_the_gap_with_one_teacher_is_refused_and_fitted_with_two():
    n, c = _grid()
    with pytest.raises(ConfigError, match="not identifiable"):
        fit_law(n, c, _law(n, c), gap=4e5 / n)
    # Two teachers (N_T alternating per cell): the gap varies apart from N and is fitted.
    n_t = np.where(np.arange(len(n)) % 2 == 0, 2e5, 8e5)
    gap = n_t / n
    loss = _law(n, c) + 1e-3 * gap**0.5
    fit = fit_law(n, c, loss, gap=gap)
    assert fit.params["gamma"] == pytest.approx(0.5, abs=0.05)
    assert fit.params["alpha"] == pytest.approx(0.5, abs=0.05)


def _fake_result(cells):
    sizes = [
        {
            "hidden": h,
            "params": p,
            "params_total": p + 100,
            "teacher_params": 4e5,
            "step_flops": 1e6,
            "steps": 10,
        }
        for h, p in ((8, 5e3), (16, 1.2e4), (32, 3e4), (48, 6e4), (64, 1.3e5))
    ]
    return {
        "task": "reverse",
        "method": "gkd",
        "teacher": {"params": 4e5, "accuracy": 1.0},
        "settings": {"seeds": 1, "layers": 2, "eval_rows": 100},
        "wall_seconds": 1.0,
        "sizes": sizes,
        "cells": cells,
    }


def test_report_names_where_the_fit_fails(tmp_path):
    n, c = _grid()
    kl = _law(n, c)
    hidden = dict(zip((5e3, 1.2e4, 3e4, 6e4, 1.3e5), (8, 16, 32, 48, 64)))
    cells = [
        {
            "hidden": hidden[a],
            "params": a,
            "flops": b,
            "teacher_kl": k,
            "gap": 4e5 / a,
            "seed": 0,
            "step": 1,
            "budget": i % 4,
            "accuracy": 1.0 if k < 0.35 else 0.5,
        }
        for i, (a, b, k) in enumerate(zip(n, c, kl))
    ]
    result = _fake_result(cells)
    result["fits"] = scaling_report.analyse(cells, eval_rows=100, resamples=30)
    notes = " | ".join(result["fits"]["notes"])
    saturated = sum(x["accuracy"] == 1.0 for x in cells)
    assert 0 < saturated < 20
    assert f"{saturated} of 20 cells saturate" in notes
    assert "not identifiable" in notes
    assert result["fits"]["teacher_kl"]["params"]["alpha"] == pytest.approx(0.5, rel=1e-3)
    scaling_report.write_report(result, tmp_path, log=lambda *_: None)
    text = (tmp_path / "results.md").read_text()
    assert "| alpha | 0.5 [" in text and "Where the fit fails" in text
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


def test_tiny_grid_runs_end_to_end(tmp_path):
    s = scaling.ScalingSettings(
        hidden=(4, 8, 12, 16),
        budget_fractions=(0.34, 0.67, 1.0),
        steps=3,
        batch_size=4,
        train_rows=64,
        eval_rows=6,
        kl_rows=4,
        resamples=20,
        progress=False,
        teacher_preset=TeacherPreset(hidden=32, layers=1, heads=2, steps=3, batch_size=8, warmup=1),
        cache_dir=str(tmp_path / "cache"),
        layers=1,
    )
    result = scaling.run_scaling(s, tmp_path / "out", log=lambda *_: None)
    saved = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert len(saved["cells"]) == 12 == len(result["cells"])
    params = [r["params"] for r in saved["sizes"]]
    assert params == sorted(params) and len(set(params)) == 4
    # Equal budgets: a smaller student takes at least as many steps as a larger one.
    steps = [r["steps"] for r in saved["sizes"]]
    assert steps == sorted(steps, reverse=True) and steps[0] > steps[-1]
    for cell in saved["cells"]:
        assert cell["flops"] > 0 and math.isfinite(cell["teacher_kl"]) and cell["teacher_kl"] >= 0
        assert 0.0 <= cell["accuracy"] <= 1.0
    # Within a size the budget points are increasing in FLOPs and steps.
    for h in (4, 8, 12, 16):
        mine = [x for x in saved["cells"] if x["hidden"] == h]
        assert [x["budget"] for x in mine] == [0, 1, 2]
        assert [x["flops"] for x in mine] == sorted(x["flops"] for x in mine)
    fit = saved["fits"]["teacher_kl"]
    assert set(fit["ci"]) == {"E", "A", "alpha", "B", "beta"} and len(fit["residuals"]) == 12
    assert (tmp_path / "out" / "results.md").read_text().count("\n| 4 | 0 |") == 3
