"""`opd bench scaling` (issue 12 item 8's sweep) is a sub-command of `opd bench`, like quality
and speed: --help lists its options, a bad option or value is one `opd: error:` line."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from tests.helpers import assert_clean_error, run_opd


def test_opd_bench_scaling_help_lists_its_options():
    res = run_opd(["bench", "scaling", "--help"])
    assert res.code == 0 and res.traceback is None
    assert res.out.startswith("usage: opd bench scaling")
    for option in ("--hidden", "--budget-fractions", "--seeds", "--steps", "--method", "--out"):
        assert option in res.out
    res = run_opd(["bench", "--help"])
    assert res.code == 0 and "scaling" in res.out


def test_bad_options_are_one_clean_error_line(tmp_path):
    res = run_opd(["bench", "scaling", "--bogus"])
    line = assert_clean_error(res, "bench scaling", "unrecognized arguments: --bogus")
    assert line.endswith("(see `opd bench scaling --help`)")
    assert_clean_error(run_opd(["bench", "scaling", "--seeds", "x"]), "--seeds", "'x'")
    out = tmp_path / "out"
    res = run_opd(["bench", "scaling", "--hidden", "16", "32", "--out", out])
    assert_clean_error(res, "--hidden", "at least 4")  # checked before anything runs
    assert not out.exists()
    assert_clean_error(run_opd(["bench", "nosuch"]), "invalid choice: 'nosuch'", "scaling")


@pytest.mark.parametrize("command", ["quality", "speed"])
def test_bench_quality_and_speed_bad_options_are_one_line(command):
    res = run_opd(["bench", command, "--bogus"])
    line = assert_clean_error(res, f"bench {command}", "unrecognized arguments: --bogus")
    assert line.endswith(f"(see `opd bench {command} --help`)")
    assert res.err.count("\n") == 1  # not argparse's usage block + error line


def test_python_m_opd_bench_and_the_script_reach_the_same_parser(capsys, monkeypatch):
    from opd.bench.__main__ import main

    with pytest.raises(SystemExit) as exc:  # `python -m opd.bench scaling --bogus`
        main(["scaling", "--bogus"])
    assert exc.value.code == 2
    assert "opd: error: bench scaling: unrecognized arguments" in capsys.readouterr().err
    script = Path(__file__).parents[1] / "benchmarks" / "bench_scaling.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--bogus"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(script), run_name="__main__")
    assert exc.value.code == 2
    assert "opd: error: bench scaling: unrecognized arguments" in capsys.readouterr().err
