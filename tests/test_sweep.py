"""The quality benchmark's stability record (opd.bench.stability) and lr sweep (opd.bench.sweep)."""

import dataclasses
import json
import math

import pytest

from opd.bench import plots, quality
from opd.bench.stability import collapse_record, is_repetitive, loss_spikes, text_stats
from opd.bench.sweep import choose_lr, sweep_markdown
from opd.tasks.teacher import TeacherPreset

ROWS = [
    {"prompt": "chain: 3*3-2-7\n", "answer": "0"},
    {"prompt": "chain: 3*3-2-7\n", "answer": "0"},
]


def test_repetition_needs_six_copies_of_a_short_string():
    assert is_repetitive("3 3 3 3 3 3 ") and is_repetitive("=5=5=5=5=5=5")
    assert is_repetitive("aaaaaa") and not is_repetitive("aaaaa")
    assert not is_repetitive("1 2 3 4 5 6 7 8 9") and not is_repetitive("3*3=9;9-2=7;7-7=0 => 0")
    assert not is_repetitive("abcde" * 6)  # a 5-character period is not a loop here


def test_text_stats_count_markers_spam_and_errors():
    good = "3*3=9;9-2=7;7-7=0 => 0"
    fixed = "3*3=8!9;9-2=7;7-7=0 => 0"  # one correction, still right
    spam = "3*3=1!2!3!4!9;9-2=7;7-7=0 => 0"  # four markers: spam
    out = text_stats("chain_fix", [good, fixed], ROWS)
    assert out["accuracy"] == 1.0 and out["corrections_mean"] == 0.5
    assert out["with_correction"] == 0.5 and out["marker_spam"] == 0.0
    out = text_stats("chain_fix", [spam, "0 0 0 0 0 0 0"], ROWS)
    assert out["marker_spam"] == 0.5 and out["repetitive"] == 0.5 and out["accuracy"] <= 0.5
    assert "marker_spam" not in text_stats("reverse", ["ab"], [{"answer": "ab"}])


def test_loss_spikes_against_the_recent_median():
    assert loss_spikes([1.0] * 10 + [6.0]) == (0, 1)
    assert loss_spikes([1.0] * 10 + [4.9]) == (0, 0)
    assert loss_spikes([1.0] * 9 + [9.0]) == (0, 0)  # fewer than 10 earlier steps: no verdict
    assert loss_spikes([0.001] * 10 + [0.04]) == (0, 0)  # under the floor
    assert loss_spikes([1.0, math.nan, math.inf]) == (2, 0)
    # A loss that fell from 1.0 to 0.1 and jumps to 0.6 is 6x the recent median but below
    # where the run started: no spike (mixed-batch recipes jump like this when healthy).
    assert loss_spikes([1.0] * 10 + [0.1] * 10 + [0.6]) == (0, 0)
    assert loss_spikes([1.0] * 10 + [0.1] * 10 + [1.2]) == (0, 1)


def test_collapse_record_names_each_reason_and_the_lr():
    start = {"accuracy": 0.6, "repetitive": 0.0, "marker_spam": 0.0}
    fine = collapse_record([1.0] * 20, {"accuracy": 0.5, "repetitive": 0.1}, start, 2e-3)
    assert fine == {
        "collapsed": False,
        "reasons": [],
        "lr": 2e-3,
        "loss_spikes": 0,
        "warnings": [],
        "nonfinite_losses": 0,
        "repetitive": 0.1,
        "marker_spam": None,
    }
    bad = collapse_record(
        [1.0] * 10 + [50.0, math.nan],
        {"accuracy": 0.2, "repetitive": 0.4, "marker_spam": 0.3},
        start,
        8e-3,
    )
    assert bad["collapsed"] and bad["lr"] == 8e-3
    assert bad["reasons"] == ["nonfinite_loss", "repetition", "marker_spam", "accuracy_collapse"]
    assert bad["loss_spikes"] == 1 and bad["warnings"] == ["loss_spike"]
    spiky = collapse_record([1.0] * 10 + [50.0], {"accuracy": 0.6}, start, 8e-3)
    assert not spiky["collapsed"] and spiky["warnings"] == ["loss_spike"]  # a warning only
    # A share already there at the warm-up checkpoint is not a collapse of this run.
    was = collapse_record(
        [1.0], {"accuracy": 0.6, "repetitive": 0.3}, {**start, "repetitive": 0.25}, 1e-3
    )
    assert not was["collapsed"]


def _run(lr, acc, kl, collapsed=False):
    return {
        "method": "m",
        "lr": lr,
        "valid": {"accuracy": acc, "teacher_kl": kl},
        "stability": {"collapsed": collapsed, "reasons": ["loss_spike"] * collapsed},
    }


def test_choose_lr_by_validation_accuracy_then_kl_then_smaller_lr():
    assert choose_lr([_run(1e-3, 0.5, 1.0), _run(2e-3, 0.6, 2.0)])["lr"] == 2e-3
    assert choose_lr([_run(1e-3, 0.6, 1.0), _run(2e-3, 0.6, 0.5)])["lr"] == 2e-3
    assert choose_lr([_run(1e-3, 0.6, 1.0), _run(2e-3, 0.6, 1.0)])["lr"] == 1e-3
    assert choose_lr([_run(1e-3, 0.5, None), _run(2e-3, 0.5, 0.3)])["lr"] == 2e-3
    # A collapsed run is passed over, unless every lr collapsed.
    assert choose_lr([_run(1e-3, 0.2, 1.0), _run(8e-3, 0.9, 1.0, True)])["lr"] == 1e-3
    assert choose_lr([_run(1e-3, 0.2, 1.0, True), _run(8e-3, 0.9, 1.0, True)])["lr"] == 8e-3


def test_sweep_table_and_paired_differences_render_the_numbers():
    runs = [_run(1e-3, 0.25, 1.5), _run(8e-3, 0.5, 0.75, True)]
    for r in runs:
        r["heldout"] = {}
    text = sweep_markdown({"lrs": [1e-3, 8e-3], "chosen": {"m": 1e-3}, "runs": runs})
    assert "| m | 25.0 / 1.500 | 50.0 / 0.750 | 0.001 | 0.008 (loss_spike) |" in text
    result = {
        "summary": {"supervised_kd": {}, "on_policy_rkl": {}},
        "runs": [
            {"method": m, "seed": s, "final": {"accuracy": a}}
            for m, s, a in (
                ("supervised_kd", 0, 0.5),
                ("supervised_kd", 1, 0.25),
                ("on_policy_rkl", 0, 0.75),
                ("on_policy_rkl", 1, 0.0),
            )
        ],
    }
    assert "| on_policy_rkl | +25.0 | -25.0 | 0.0 ± 35.4 |" in plots.paired_markdown(result)
    assert plots.paired_markdown({**result, "runs": result["runs"][2:]}) == ""


@pytest.mark.slow
def test_tiny_lr_sweep_picks_on_validation_and_reuses_seed_zero(tmp_path):
    s = quality.Settings(
        task="chain_fix", seeds=2, methods=("supervised_kd", "sampled_rkl"), steps=2,
        lrs=(1e-3, 3e-2), warmup_steps=2, batch_size=4, train_rows=64, eval_rows=6, kl_rows=4,
        eval_points=(1.0,), valid_rows=5, student_hidden=16, student_layers=1, student_heads=2,
        threads=1, progress=False, workers=1, cache_dir=str(tmp_path / "cache"),
        teacher_preset=TeacherPreset(hidden=32, layers=1, heads=2, steps=3, batch_size=8,
                                     warmup=1, corrupt_fraction=0.5),
    )  # fmt: skip
    result = quality.run_quality(s, tmp_path / "out", log=lambda *_: None)
    sweep = result["sweep"]
    assert sweep["lrs"] == [1e-3, 3e-2] and len(sweep["runs"]) == 4
    assert (tmp_path / "out" / "valid.jsonl").is_file()  # a fixed warm-up still gets one
    for m in s.methods:
        tried = [r for r in sweep["runs"] if r["method"] == m]
        best = max(r["valid"]["accuracy"] for r in tried)
        assert sweep["chosen"][m] in s.lrs
        assert next(r for r in tried if r["lr"] == sweep["chosen"][m])["valid"]["accuracy"] == best
        seeds = [r for r in result["runs"] if r["method"] == m]
        assert sorted(r["seed"] for r in seeds) == [0, 1]
        assert {r["lr"] for r in seeds} == {sweep["chosen"][m]}
        assert all("stability" in r and "teacher_fkl" in r["final"] for r in seeds)
    saved = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert saved["summary"]["supervised_kd"]["lr"] == sweep["chosen"]["supervised_kd"]
    text = (tmp_path / "out" / "results.md").read_text()
    assert "Learning-rate sweep" in text and "Paired per-seed differences" in text
    # Re-selection (opd.bench.reselect): pretend sampled_rkl had been given the other lr; the
    # current rule chooses the right one again and only that method's seeds are retrained.
    from opd.bench.reselect import reselect

    path, m = tmp_path / "out" / "quality.json", "sampled_rkl"
    right = saved["sweep"]["chosen"][m]
    wrong = next(lr for lr in s.lrs if lr != right)
    saved["sweep"]["chosen"][m] = wrong
    kept = [r for r in saved["runs"] if r["method"] != m]
    saved["runs"] = kept + [{**r, "lr": wrong} for r in saved["runs"] if r["method"] == m]
    path.write_text(json.dumps(saved))
    again = reselect(tmp_path / "out", workers=1, log=lambda *_: None)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the sweep's teacher, not a new one
    assert again["reselected"]["changed"] == [m]
    assert again["reselected"]["previous"][m] == wrong
    assert {r["lr"] for r in again["runs"] if r["method"] == m} == {right}
    assert [r["final"] for r in again["runs"] if r["method"] != m] == [r["final"] for r in kept]
    assert json.loads(path.read_text())["summary"][m]["lr"] == right


def _result(task, accs):
    """A minimal quality.json: per method, per-seed final accuracies."""
    runs = [{"method": m, "seed": s, "final": {"accuracy": a, "teacher_kl": 0.5}}
            for m, xs in accs.items() for s, a in enumerate(xs)]  # fmt: skip
    summary = {m: {"lr": 2e-3, "collapsed": 0, "seeds": len(xs)} for m, xs in accs.items()}
    warm = [{"steps": 100, "final": {"accuracy": 0.1, "teacher_kl": 1.0}}]
    teacher = {"eval": {"accuracy": 1.0}, "recovery_accuracy": {"1": 0.9, "2": 0.8, "3": 0.5}}
    return {"task": task, "runs": runs, "summary": summary, "warmup": warm, "teacher": teacher}


def test_design_tables_report_gaps_to_supervised_kd(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "compare_designs.py"
    spec = importlib.util.spec_from_file_location("compare_designs", path)
    cd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cd)
    old = _result("chain", {"supervised_kd": [0.5, 0.75], "on_policy_rkl": [0.25, 0.5]})
    new = _result("chain_fix", {"supervised_kd": [0.5, 0.5], "on_policy_rkl": [0.75, 0.5]})
    text = cd.task_table(new)
    assert "recovery from 1 / 2 / 3 errors 90.0 / 80.0 / 50.0 %" in text
    assert "| on_policy_rkl | 0.002 | 62.5 ± 17.7 | 0.5000 ± 0.0000 | — | — | 0/2 |" in text
    # old gap: −25, −25 (mean −25); new gap: +25, 0 (mean +12.5); change +37.5
    row = "| on_policy_rkl | 37.5 ± 17.7 | -25.0 ± 0.0 | 62.5 ± 17.7 | 12.5 ± 17.7 | +37.5 |"
    assert row in cd.design_table(old, new)


def test_reselect_never_trains_another_teacher(tmp_path):
    """A quality.json whose settings name no cached teacher: a clear error, nothing trained
    (before, re-selection dropped a variant's teacher preset and trained the default one)."""
    from opd.bench.reselect import reselect
    from opd.errors import ConfigError

    out = tmp_path / "out"
    out.mkdir()
    settings = dataclasses.asdict(quality.Settings(task="chain_fix", cache_dir=str(tmp_path / "c")))
    settings["teacher_preset"] = dataclasses.asdict(TeacherPreset(hidden=32, layers=1, steps=3))
    result = {"task": "chain_fix", "settings": settings, "warmup": [], "runs": [],
              "sweep": {"lrs": [1e-3], "chosen": {"supervised_kd": 1e-3}, "runs": []}}  # fmt: skip
    (out / "quality.json").write_text(json.dumps(result))
    with pytest.raises(ConfigError, match=r"no cached chain_fix teacher at .*cached_only"):
        reselect(out, workers=1, log=lambda *_: None)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
