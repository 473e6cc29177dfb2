"""The numbers of a run's report, read from metrics.jsonl: step rows, eval rows, the scalar
diagnostics of `opd.diagnostics` at the first and last evaluation, and sample completions.

Used by `opd report` (HTML) and by `opd distill` / `opd demo` (the diagnostics section of
report.md and report.json)."""

from __future__ import annotations

import json
from pathlib import Path

from opd.errors import OpdError

# (key, label) of the scalar numbers shown per evaluation, in this order
EVAL_COLUMNS = (
    ("heldout_kl", "held-out KL(q_student ‖ p_teacher)"),
    ("heldout_accuracy", "accuracy"),
    ("diag_rkl_own", "KL(q‖p), own prefixes"),
    ("diag_rkl_teacher", "KL(q‖p), teacher prefixes"),
    ("diag_exposure_gap_rkl", "exposure gap, KL(q‖p)"),
    ("diag_fkl_own", "KL(p‖q), own prefixes"),
    ("diag_fkl_teacher", "KL(p‖q), teacher prefixes"),
    ("diag_exposure_gap_fkl", "exposure gap, KL(p‖q)"),
    ("diag_topk_overlap", "top-10 overlap"),
    ("diag_entropy", "student entropy (nats)"),
    ("diag_length", "completion length"),
    ("diag_stop_rate", "stop rate"),
    ("diag_ece", "ECE (10 bins)"),
    ("diag_seconds", "diagnostics seconds"),
)


def read_rows(run_dir: Path) -> list[dict]:
    """The readable rows of RUN_DIR/metrics.jsonl (a line torn by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise OpdError(f"opd report: '{run_dir}' is not a folder; give a run folder of opd distill")
    if not path.is_file():
        raise OpdError(
            f"opd report: '{path}' does not exist; give a run folder written by opd distill"
        )
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(step rows, eval rows) in file order."""
    steps = [r for r in rows if "event" not in r and "loss" in r]
    evals = [r for r in rows if r.get("event") == "eval"]
    return steps, evals


def fmt(value) -> str:
    """How a number appears in the report (6 significant digits); '—' for none."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—"
    return f"{value:.6g}"


def diagnostics_summary(evals: list[dict]) -> dict:
    """{"first": {...}, "last": {...}}: the scalar numbers of the first and last evaluation."""
    if not evals:
        return {}
    pick = lambda r: {"step": r.get("step"), **{k: r.get(k) for k, _ in EVAL_COLUMNS}}  # noqa: E731
    return {"first": pick(evals[0]), "last": pick(evals[-1])}


def diag_json(summary: dict, evals: list[dict]) -> dict:
    """`summary` (report.json's dict) with the "diagnostics" of `diagnostics_summary` added."""
    return {**summary, "diagnostics": diagnostics_summary(evals)}


def diag_markdown(evals: list[dict]) -> str:
    """A markdown section (first vs last evaluation) for report.md; '' without evaluations."""
    if not evals or not any(k in evals[-1] for k in ("diag_entropy", "diag_length")):
        return ""
    first, last = evals[0], evals[-1]
    lines = [
        "",
        "## Diagnostics (opd.diagnostics; `opd report RUN_DIR` draws them)",
        "",
        f"| | step {first.get('step')} | step {last.get('step')} |",
        "|---|---|---|",
    ]
    for key, label in EVAL_COLUMNS:
        lines.append(f"| {label} | {fmt(first.get(key))} | {fmt(last.get(key))} |")
    note = last.get("diag_note")
    if note:
        lines += ["", f"Note: {note}."]
    return "\n".join(lines) + "\n"


def before_after_samples(run_dir: Path, evals: list[dict]) -> tuple[list, list, str]:
    """(before rows, after rows, where from): the diagnostics' samples of the first and last
    evaluation, else the first and last step of samples.jsonl (`train.sample_every`)."""
    if evals and evals[0].get("diag_samples") and evals[-1].get("diag_samples"):
        first, last = evals[0], evals[-1]
        src = f"held-out evaluation at steps {first['step']} and {last['step']}"
        return first["diag_samples"], last["diag_samples"], src
    from opd.samples import read_samples

    rows = read_samples(run_dir)
    if not rows:
        return [], [], "no samples (evaluation off and train.sample_every=0)"
    lo, hi = min(r["step"] for r in rows), max(r["step"] for r in rows)
    before = [r for r in rows if r["step"] == lo][:3]
    after = [r for r in rows if r["step"] == hi][:3]
    return before, after, f"samples.jsonl at steps {lo} and {hi}"
