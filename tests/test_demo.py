"""`opd demo` end to end on the real embedded teacher, with a small budget (slow)."""

from __future__ import annotations

import json

import pytest

from opd.cli import main


@pytest.mark.slow
def test_demo_small_budget(tmp_path, capsys):
    run = tmp_path / "demo"
    code = main(
        [
            "demo",
            "train.steps=2",
            "train.batch_size=2",
            "data.eval_count=2",
            "sampling.max_new_tokens=8",
            "train.progress=false",
            f"output_dir={run}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "teacher" in out and "student before" in out and "student after" in out
    report = json.loads((run / "report.json").read_text())
    assert report["kl_before"] > 0
    # two on-policy reverse-KL steps at lr 5e-5 already move the pruned student toward the teacher
    assert report["kl_after"] < report["kl_before"]
    assert set(report["accuracy"]) == {"teacher", "student_before", "student_after"}
    assert (run / "student" / "config.json").is_file() and (run / "report.md").is_file()
