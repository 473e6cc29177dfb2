"""`opd report RUN_DIR`: PNG figures and an HTML page whose numbers are metrics.jsonl's."""

from __future__ import annotations

import json
import re

import pytest

from opd.logs import read_metrics
from opd.report.plots import FIGURES
from opd.report.summary import fmt
from tests.helpers import (
    assert_clean_error,
    run_opd,
    save_tiny_models,
    small_cli_args,
    tree_digest,
    write_prompts,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step `opd distill` on saved tiny models (evaluation at steps 0, 1 and 2)."""
    tmp = tmp_path_factory.mktemp("report")
    dirs = save_tiny_models(tmp)
    data = write_prompts(tmp / "p.jsonl", n=12)
    res = run_opd(["distill", *small_cli_args(tmp, dirs, data, "train.eval_every=1")])
    assert res.code == 0, res.err + (res.traceback or "")
    return tmp / "run"


def cells(html: str) -> dict:
    found = re.findall(r"<td data-step='(\d+)' data-key='(\w+)'>([^<]*)</td>", html)
    return {(int(s), k): v for s, k, v in found}


def test_report_writes_figures_and_html_matching_metrics(finished_run):
    before = tree_digest(finished_run)
    res = run_opd(["report", finished_run])
    assert res.code == 0, res.err + (res.traceback or "")
    out = finished_run / "report"
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, name
    html = (out / "index.html").read_text()
    evals = [r for r in read_metrics(finished_run / "metrics.jsonl") if r.get("event") == "eval"]
    got = cells(html)
    assert [r["step"] for r in evals] == [0, 1, 2]
    for r in evals:
        for key in ("heldout_kl", "diag_rkl_own", "diag_exposure_gap_rkl", "diag_ece"):
            assert got[(r["step"], key)] == fmt(r[key]), (r["step"], key)
            assert abs(float(got[(r["step"], key)]) - r[key]) <= 1e-5 * max(1, abs(r[key]))
    # three sample prompts, the student before and after beside the teacher
    assert html.count("<tr class='sample'>") == 3
    assert evals[0]["diag_samples"][0]["student"] in html
    # the run folder itself is unchanged apart from the new report/ folder
    after = {k: v for k, v in tree_digest(finished_run).items() if not k.startswith("report/")}
    assert after == before


def test_distill_writes_the_diagnostics_into_report_md_and_json(finished_run):
    md = (finished_run / "report.md").read_text()
    assert "## Diagnostics" in md and "exposure gap, KL(q‖p)" in md
    diag = json.loads((finished_run / "report.json").read_text())["diagnostics"]
    last = read_metrics(finished_run / "metrics.jsonl")[-1]
    assert diag["last"]["step"] == 2
    assert diag["last"]["diag_exposure_gap_fkl"] == last["diag_exposure_gap_fkl"]


def test_report_of_a_run_without_teacher_logits(tmp_path):
    """A black-box run (nulls) and no diagnostics samples: figures say 'no ...', no crash."""
    rows = [
        {"step": 1, "loss": 1.0, "teacher_kl": 0.0, "seconds": 0.1},
        {"event": "eval", "step": 1, "heldout_kl": None, "heldout_accuracy": 0.5,
         "diag_rkl_own": None, "diag_entropy": 1.5, "diag_length": 4.0,
         "diag_note": "teacher gives no full logits"},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_opd(["report", tmp_path, "--out", tmp_path / "r"])
    assert res.code == 0, res.err + (res.traceback or "")
    html = (tmp_path / "r" / "index.html").read_text()
    assert cells(html)[(1, "diag_entropy")] == "1.5" and cells(html)[(1, "heldout_kl")] == "—"
    assert "no full logits" in html and "no samples" in html


def test_report_of_a_folder_that_is_no_run(tmp_path):
    assert_clean_error(run_opd(["report", tmp_path / "nope"]), "nope", "not a folder")
    assert_clean_error(run_opd(["report", tmp_path]), "metrics.jsonl")
