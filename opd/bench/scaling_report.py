"""The scaling sweep's analysis and report: fits with bootstrap CIs, failure notes, table, plot.

Two targets are fitted with `opd.bench.scaling_fit` (L = E + A·N^(−α) + B·C^(−β)):

    teacher_kl   held-out token-mean KL(q_student ‖ p_teacher) on greedy student completions
    error_rate   1 − greedy exact-match accuracy, floored at 0.5 / eval_rows (half a problem)
                 so that a perfect cell has a finite log; such cells are counted as saturated

The teacher–student gap N_T / N_S is tried as a covariate and reported as not identifiable
when there is one teacher. "Where the fit fails" is written from the numbers: saturated
cells, parameters whose 95 % CI spans more than a factor 10 or reaches 0, exponents whose
CI includes 0, R² below 0.9, the worst-fitted cell, budgets where a larger student is worse.
matplotlib is optional; without it the figure is skipped with a note.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from opd.bench.scaling_fit import bootstrap, fit_law
from opd.errors import ConfigError

TARGETS = {"teacher_kl": "held-out KL(q_student ‖ p_teacher)", "error_rate": "error rate 1 − acc"}


def _values(cells: list[dict], target: str, eval_rows: int) -> np.ndarray:
    if target == "teacher_kl":
        return np.array([c["teacher_kl"] for c in cells], float)
    return np.array([max(1.0 - c["accuracy"], 0.5 / eval_rows) for c in cells], float)


def analyse(cells: list[dict], *, eval_rows: int, resamples: int = 200, seed: int = 0) -> dict:
    """Both fits (params, 95 % CIs, R², residuals per cell) and the notes on where they fail."""
    n = np.array([c["params"] for c in cells], float)
    comp = np.array([c["flops"] for c in cells], float)
    out: dict = {"notes": []}
    for target in TARGETS:
        y = _values(cells, target, eval_rows)
        try:
            if np.ptp(y) == 0:
                raise ConfigError(f"every cell has the same value {y[0]:g}; nothing to fit")
            fit = bootstrap(n, comp, y, fit_law(n, comp, y), resamples=resamples, seed=seed)
        except ConfigError as e:
            out[target] = {"error": str(e)}
            out["notes"].append(f"{TARGETS[target]}: no fit ({e})")
            continue
        pred = fit.predict(n, comp)
        out[target] = {
            "params": fit.params,
            "ci": fit.ci,
            "r2": fit.r2,
            "residuals": fit.residuals,
            "predicted": pred.tolist(),
            "boot_ok": fit.boot_ok,
            "boot_redrawn": fit.boot_redrawn,
        }
        out["notes"] += _fit_notes(TARGETS[target], fit, cells)
    try:
        fit_law(n, comp, _values(cells, "teacher_kl", eval_rows), gap=[c["gap"] for c in cells])
        out["notes"].append("gap: the teacher–student gap term was fitted (more than one teacher)")
    except ConfigError as e:
        out["notes"].append(f"gap: {str(e).removeprefix('fit_law: ')}")
    sat = sum(c["accuracy"] in (0.0, 1.0) for c in cells)
    if sat:
        tail = (
            "with most cells saturated the error-rate fit carries no information"
            if 2 * sat >= len(cells)
            else "the error-rate fit is shaped by the floor there"
        )
        out["notes"].append(
            f"accuracy: {sat} of {len(cells)} cells saturate at 0 or 1 (error "
            f"floored at {0.5 / eval_rows:g}); {tail}"
        )
    out["notes"] += _monotone_notes(cells)
    return out


def _fit_notes(name: str, fit, cells) -> list[str]:
    notes = []
    if fit.r2 < 0.9:
        notes.append(f"{name}: R² = {fit.r2:.2f} in log space; the law explains little")
    for k, (lo, hi) in fit.ci.items():
        if k in ("alpha", "beta", "gamma"):
            if lo <= 0 <= hi:
                notes.append(
                    f"{name}: {k} CI [{lo:.3g}, {hi:.3g}] includes 0 (no evidence of a "
                    "power-law decrease along that axis)"
                )
            elif hi - lo > 1.0:
                notes.append(f"{name}: {k} is loosely pinned down, CI [{lo:.3g}, {hi:.3g}]")
        elif lo <= 0 or hi / lo > 10:
            notes.append(f"{name}: {k} is not identified, 95 % CI [{lo:.3g}, {hi:.3g}]")
    i = int(np.argmax(np.abs(fit.residuals)))
    c = cells[i]
    notes.append(
        f"{name}: worst cell hidden {c['hidden']} at {c['flops'] / 1e9:.3g} GFLOP, "
        f"measured/fitted = {math.exp(fit.residuals[i]):.2f}"
    )
    return notes


def _monotone_notes(cells) -> list[str]:
    """Budgets (index `budget`, mean over seeds) where a larger student has a higher KL."""
    notes = []
    for k in sorted({c["budget"] for c in cells}):
        sizes = sorted({c["hidden"] for c in cells if c["budget"] == k})
        kl = [
            np.mean([c["teacher_kl"] for c in cells if c["budget"] == k and c["hidden"] == h])
            for h in sizes
        ]
        worse = [f"{a}→{b}" for a, b, x, y in zip(sizes, sizes[1:], kl, kl[1:]) if y > x]
        if worse:
            notes.append(
                f"teacher_kl: at budget #{k + 1} a wider student has a higher KL "
                f"(hidden {', '.join(worse)}): KL is not monotone in N there"
            )
    return notes


# ------------------------------------------------------------------------ markdown and figure


def _ci(fit: dict, k: str) -> str:
    v, (lo, hi) = fit["params"][k], fit["ci"].get(k, (float("nan"),) * 2)
    return f"{v:.3g} [{lo:.3g}, {hi:.3g}]"


def _cell(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(result: dict) -> str:
    fits, s = result["fits"], result["settings"]
    lines = [
        f"Task `{result['task']}`, recipe `{result['method']}`, teacher "
        f"{result['teacher'].get('params')} params (held-out accuracy "
        f"{result['teacher'].get('accuracy')}), {s['seeds']} seed(s) per cell, "
        f"{result['wall_seconds'] / 60:.1f} min wall.",
        "",
        "| hidden × layers | N (no input emb.) | total params | N_T / N | MFLOP / step | steps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["sizes"]:
        lines.append(
            f"| {r['hidden']} × {s['layers']} | {r['params']:,} | {r['params_total']:,} "
            f"| {r['teacher_params'] / r['params']:.1f} | {r['step_flops'] / 1e6:.1f} "
            f"| {r['steps']} |"
        )
    lines += [
        "",
        "| hidden | seed | step | GFLOP | accuracy % | KL held-out | KL fitted | log residual |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    kl_fit = fits.get("teacher_kl", {})
    for i, c in enumerate(result["cells"]):
        pred = f"{kl_fit['predicted'][i]:.4f}" if "predicted" in kl_fit else "—"
        res = f"{kl_fit['residuals'][i]:+.3f}" if "residuals" in kl_fit else "—"
        lines.append(
            f"| {c['hidden']} | {c['seed']} | {c['step']} | {c['flops'] / 1e9:.3g} "
            f"| {100 * c['accuracy']:.1f} | {c['teacher_kl']:.4f} | {pred} | {res} |"
        )
    lines += [
        "",
        "Fit L = E + A·N^(−α) + B·C^(−β) (N parameters, C FLOPs), least squares in "
        "log space; value [95 % bootstrap CI over cells]:",
        "",
        "| parameter | " + " | ".join(TARGETS.values()) + " |",
        "|---|---:|---:|",
    ]
    for k in ("alpha", "beta", "E", "A", "B"):
        row = [_ci(fits[t], k) if "params" in fits.get(t, {}) else "no fit" for t in TARGETS]
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    for label, key in (("R² (log space)", "r2"), ("bootstrap resamples", "boot_ok")):
        row = [_cell(fits.get(t, {}).get(key), ".3f" if key == "r2" else "d") for t in TARGETS]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += ["", "Where the fit fails (computed from the numbers above):", ""]
    lines += [f"- {n}" for n in fits["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    """KL and error rate vs compute per size, measured points and fitted curves."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        return False
    cells, fits = result["cells"], result["fits"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    err_floor = 0.5 / result["settings"]["eval_rows"]
    for ax, target in zip(axes, TARGETS):
        fit = fits.get(target, {})
        for j, size in enumerate(result["sizes"]):
            mine = [c for c in cells if c["hidden"] == size["hidden"]]
            x = np.array([c["flops"] for c in mine])
            y = np.array(
                [
                    c["teacher_kl"] if target == "teacher_kl" else max(1 - c["accuracy"], err_floor)
                    for c in mine
                ]
            )
            color = f"C{j}"
            ax.scatter(x, y, color=color, s=18, label=f"N = {size['params']:,}")
            if "params" in fit:
                p = fit["params"]
                xs = np.geomspace(x.min() / 1.3, x.max() * 1.3, 50)
                ax.plot(
                    xs,
                    p["E"] + p["A"] * size["params"] ** -p["alpha"] + p["B"] * xs ** -p["beta"],
                    color=color,
                    lw=1,
                )
        ax.set_xscale("log"), ax.set_yscale("log")
        for axis in (ax.yaxis,):  # plain numbers: the KL range can be narrow on a log axis
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel("estimated training FLOPs C")
        ax.set_ylabel(TARGETS[target])
        if "params" in fit:
            p = fit["params"]
            ax.set_title(
                f"α = {p['alpha']:.2f}, β = {p['beta']:.2f}, R² = {fit['r2']:.2f}", fontsize=10
            )
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{result['task']}, {result['method']}: points measured, lines E + A·N^-α + B·C^-β",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(result: dict, out_dir: Path, log=print) -> None:
    text = markdown(result)
    if plot(result, out_dir / "scaling.png"):
        text += "\n![held-out KL and error rate vs compute per student size](scaling.png)\n"
    else:
        text += "\n(matplotlib is not installed: `pip install 'opd[plots]'` for the figure)\n"
    (out_dir / "results.md").write_text(text)
    log(text)
