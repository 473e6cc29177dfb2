"""The report's PNG figures (matplotlib, Agg backend): loss, KL curves, exposure gap over
steps, per-position KL, calibration (reliability) diagram. Every figure is always written;
one without data says why inside the picture."""

from __future__ import annotations

from pathlib import Path

from opd.errors import OpdError

FIGURES = ("loss.png", "kl.png", "exposure_gap.png", "position_kl.png", "calibration.png")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise OpdError(
            "opd report draws with matplotlib, which is not installed: pip install 'opd[plots]'"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(plt, fig, ax, path: Path, empty: str | None) -> None:
    if empty:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, wrap=True)
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def draw_all(out: Path, steps: list[dict], evals: list[dict]) -> list[Path]:
    """Write the FIGURES into `out`; returns their paths."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in FIGURES]

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x, y = _series(steps, "loss")
    ax.plot(x, y, label="training loss")
    ax.set(xlabel="optimizer step", ylabel="loss", title="loss")
    _save(plt, fig, ax, paths[0], None if x else "no training steps logged")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for rows, key, label, style in (
        (steps, "teacher_kl", "rollout KL(q_student ‖ p_teacher), per step", "-"),
        (evals, "heldout_kl", "held-out KL(q_student ‖ p_teacher)", "o-"),
        (evals, "diag_fkl_own", "held-out KL(p_teacher ‖ q_student)", "s--"),
    ):
        x, y = _series(rows, key)
        if x:
            ax.plot(x, y, style, label=label)
    ax.set(xlabel="optimizer step", ylabel="nats / token", title="KL to the teacher")
    _save(plt, fig, ax, paths[1], None if ax.lines else "no KL logged (no full-logit teacher)")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label, style in (
        ("diag_rkl_own", "KL(q‖p) on own prefixes", "o-"),
        ("diag_rkl_teacher", "KL(q‖p) on teacher prefixes", "o--"),
        ("diag_exposure_gap_rkl", "gap KL(q‖p): own − teacher", "D-"),
        ("diag_exposure_gap_fkl", "gap KL(p‖q): own − teacher", "D:"),
    ):
        x, y = _series(evals, key)
        if x:
            ax.plot(x, y, style, label=label)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set(xlabel="optimizer step", ylabel="nats / token", title="exposure-bias gap")
    _save(plt, fig, ax, paths[2], None if len(ax.lines) > 1 else "no exposure gap logged")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    curves = [r for r in evals if isinstance(r.get("diag_kl_by_position"), dict)]
    for r in {id(c): c for c in curves[:1] + curves[-1:]}.values():
        pos = r["diag_kl_by_position"]
        pts = [(s, v) for s, v in zip(pos["start"], pos["rkl"]) if v is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"step {r['step']}")
    ax.set(xlabel="completion position (bucket start)", ylabel="KL(q‖p)",
           title="KL(q_student ‖ p_teacher) by position, own prefixes")  # fmt: skip
    _save(plt, fig, ax, paths[3], None if curves else "no per-position KL logged")

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    cals = [r for r in evals if isinstance(r.get("diag_calibration"), dict)]
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, label="perfectly calibrated")
    for r in {id(c): c for c in cals[:1] + cals[-1:]}.values():
        c = r["diag_calibration"]
        pts = [(a, b) for a, b in zip(c["confidence"], c["accuracy"]) if a is not None]
        label = f"step {r['step']} (ECE {r.get('diag_ece', 0):.3f})"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.set(xlabel="student's top-1 probability", ylabel="share equal to the teacher's token",
           title="calibration on teacher-written text", xlim=(0, 1), ylim=(0, 1))  # fmt: skip
    _save(plt, fig, ax, paths[4], None if cals else "no calibration logged")
    return paths
