"""`opd report RUN_DIR`: a run's diagnostics as PNG figures and one HTML page.

Reads RUN_DIR/metrics.jsonl (step rows and the eval rows with the `diag_*` keys of
`opd.diagnostics`) and, where the evaluations carry no samples, RUN_DIR/samples.jsonl; writes
RUN_DIR/report/{index.html, loss.png, kl.png, exposure_gap.png, position_kl.png,
calibration.png} (`--out` elsewhere). Nothing else in the run folder is changed.
"""

from __future__ import annotations

from pathlib import Path

from opd.report.summary import (
    before_after_samples,
    diag_json,
    diag_markdown,
    diagnostics_summary,
    read_rows,
    split_rows,
)

__all__ = ["build_report", "diag_json", "diag_markdown", "diagnostics_summary"]


def build_report(run_dir, out=None) -> Path:
    """Write the report of `run_dir` (into `out`, default RUN_DIR/report); returns index.html."""
    from opd.report.html import render
    from opd.report.plots import draw_all

    run_dir = Path(run_dir)
    steps, evals = split_rows(read_rows(run_dir))
    out = Path(out) if out else run_dir / "report"
    figures = draw_all(out, steps, evals)
    note = (evals[-1].get("diag_note") or "") if evals else ""
    samples = before_after_samples(run_dir, evals)
    page = render(f"opd report: {run_dir.name}", figures, steps, evals, samples, note)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def add_report_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder of opd distill / demo")
    parser.add_argument("--out", help="write the report here (default RUN_DIR/report)")


def run_report(args) -> int:
    index = build_report(args.run_dir, args.out)
    print(f"report: {index}")
    return 0
