"""The benchmarks' code paths on tiny models: compute accounting, a tiny quality sweep, the
speed bench's opd side (and TRL's when it is installed)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from opd.bench import flops, loss_worker, methods, quality, speed, step_workers
from opd.sampling import dataset, mix, student, teacher
from opd.tiny import tiny_llama


def test_microbatch_flops_hand_example():
    # N_s = 100, N_t = 300, on-policy, P = 10, C = 5 (15 tokens per row-sum):
    # generation 2·100·15 = 3,000; teacher 2·300·15 = 9,000; student 6·100·15 = 9,000.
    total = flops.microbatch_flops(
        n_student=100, n_teacher=300, n_writer=100, prompt_tokens=10, completion_tokens=5
    )
    assert total == 21_000
    # Dataset completions: no generation term.
    assert flops.microbatch_flops(
        n_student=100, n_teacher=300, n_writer=0, prompt_tokens=10, completion_tokens=5
    ) == 18_000


def test_flop_params_leaves_out_the_input_embedding():
    model = tiny_llama(10, hidden=8, layers=1, heads=2, intermediate=16)
    # embed 10·8 = 80 (left out); q, k, v, o 4·8·8 = 256; gate, up, down 3·8·16 = 384;
    # two layer norms 2·8 = 16; final norm 8; lm_head 10·8 = 80.
    assert flops.flop_params(model) == 256 + 384 + 16 + 8 + 80
    tied = tiny_llama(10, hidden=8, layers=1, heads=2, intermediate=16, tie_embeddings=True)
    assert flops.flop_params(tied) == 256 + 384 + 16 + 8 + 80


def test_writer_params_per_prefix_source():
    n_s, n_t = 100.0, 300.0
    assert flops.writer_params(dataset(), n_s, n_t) == 0
    assert flops.writer_params(student(), n_s, n_t) == n_s
    assert flops.writer_params(teacher(), n_s, n_t) == n_t
    assert flops.writer_params(mix(0.25), n_s, n_t) == 25.0
    assert flops.writer_params(mix(0.25, other="teacher"), n_s, n_t) == 25.0 + 225.0
    # A logged coin overrides λ: this step the student wrote everything.
    assert flops.writer_params(mix(0.25), n_s, n_t, student_share=1.0) == n_s


def test_parse_method():
    assert methods.parse_method("gkd:lmbda=1.0,beta=0.5") == ("gkd", {"lmbda": 1.0, "beta": 0.5})
    assert methods.parse_method("seqkd") == ("seqkd", {})


def test_tiny_quality_sweep_writes_a_complete_report(tmp_path):
    from opd.tasks.teacher import TeacherPreset

    s = quality.Settings(
        task="reverse", seeds=1, methods=("supervised_kd", "gkd:lmbda=1.0,beta=0.5"), steps=2,
        warmup_steps=2, batch_size=4, train_rows=64, eval_rows=6, kl_rows=4, eval_points=(0.5, 1.0),
        student_hidden=16, student_layers=1, student_heads=2, threads=1, progress=False,
        teacher_preset=TeacherPreset(hidden=32, layers=1, heads=2, steps=3, batch_size=8, warmup=1),
        cache_dir=str(tmp_path / "cache"),
    )
    quality.run_quality(s, tmp_path / "out", log=lambda *_: None)
    result = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert {"task", "settings", "teacher", "student", "compute", "warmup", "runs", "summary"} <= set(result)
    assert set(result["summary"]) == set(s.methods)
    assert len(result["runs"]) == 2 and len(result["warmup"]) == 1
    for run in result["runs"] + result["warmup"]:
        assert run["flops"] > 0 and math.isfinite(run["flops"])
        for point in run["curve"]:
            assert 0.0 <= point["accuracy"] <= 1.0
            assert math.isfinite(point["teacher_kl"]) and point["teacher_kl"] >= 0
    steps = [p["step"] for p in result["runs"][0]["curve"]]
    assert steps == sorted(steps) and steps[-1] == result["runs"][0]["steps"]
    for row in result["summary"].values():
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and row["accuracy_std"] == 0.0
        assert math.isfinite(row["teacher_kl_mean"])
    assert result["compute"]["budget_gflop"] > 0
    text = (tmp_path / "out" / "results.md").read_text()
    assert "supervised_kd" in text and "± " in text


def _speed_args(**kw):
    base = dict(steps=2, skip=0, batch=2, new_tokens=4, beta=1.0, lr=1e-4, temperature=1.0,
                threads=1, repeats=1, vocab=0, backend="auto", sides=["opd", "trl"])
    return argparse.Namespace(**{**base, **kw})


def test_speed_opd_side_two_steps():
    out = step_workers.worker_opd(_speed_args())
    assert out["side"] == "opd" and out["steps_measured"] == 2
    for key in ("seconds_per_step", "tokens_per_s", "tokens_per_step", "peak_rss_mb",
                "tokens_per_cpu_s"):
        assert math.isfinite(out[key]) and out[key] > 0


def test_speed_bench_without_trl_reports_opd_and_names_the_extra(monkeypatch):
    monkeypatch.setattr(speed, "trl_version", lambda: None)
    fake = dict(seconds_per_step=1.0, tokens_per_s=2.0, tokens_per_step=2.0, peak_mb=3.0,
                peak_rss_mb=4.0, cpu_seconds_per_step=1.0, tokens_per_cpu_s=2.0)
    monkeypatch.setattr(speed, "_spawn", lambda args: fake)
    lines = []
    out = speed.step_bench(_speed_args(), log=lines.append)
    assert set(out) == {"opd", "vocab"} and any("pip install 'opd[bench]'" in x for x in lines)


def test_speed_bench_runs_the_requested_sides_with_their_backends(monkeypatch):
    monkeypatch.setattr(speed, "trl_version", lambda: None)
    seen = []

    def fake(args):
        seen.append(args[:3])
        return dict(seconds_per_step=1.0, tokens_per_s=2.0, tokens_per_step=2.0, peak_mb=3.0,
                    peak_rss_mb=4.0, cpu_seconds_per_step=1.0, tokens_per_cpu_s=2.0)

    monkeypatch.setattr(speed, "_spawn", fake)
    out = speed.step_bench(_speed_args(sides=["opd", "opd-hf"], repeats=2), log=lambda *_: None)
    assert set(out) == {"opd", "opd-hf", "vocab"}
    assert seen == [["opd", "--backend", "auto"], ["opd", "--backend", "hf"]] * 2


def test_speed_trl_side_two_steps():
    pytest.importorskip("trl")
    out = step_workers.worker_trl(_speed_args())
    assert out["side"] == "trl" and out["steps_measured"] == 2
    assert math.isfinite(out["tokens_per_s"]) and out["tokens_per_s"] > 0


@pytest.mark.parametrize("mode", ["opd_chunked", "opd_one_pass", "trl_chunked"])
def test_loss_paths_agree_with_materialized(monkeypatch, tmp_path, mode):
    if mode == "trl_chunked":
        pytest.importorskip("trl")
    monkeypatch.setattr(loss_worker, "VOCAB", 50)
    monkeypatch.setattr(loss_worker, "HIDDEN", 8)
    values = {}
    for m in ("opd_materialized", mode):
        a = argparse.Namespace(mode=m, n=12, beta=0.5, chunk_size=5, threads=1,
                               values_out=str(tmp_path / f"{m}.pt"))
        out = loss_worker.worker_loss(a)
        assert out["seconds"] > 0
        values[m] = torch.load(tmp_path / f"{m}.pt")
    torch.testing.assert_close(values[mode], values["opd_materialized"], atol=1e-5, rtol=1e-5)


def test_speed_markdown_renders_both_sides_and_the_loss_table():
    from opd.bench.plots import speed_markdown

    side = dict(seconds_per_step=0.5, tokens_per_s=100.0, tokens_per_cpu_s=90.0,
                tokens_per_step=50.0, peak_mb=10.0, peak_rss_mb=400.0,
                repeats=[{"trainer": "DistillationTrainer"}])
    result = {
        "trl": "1.16.0",
        "settings": dict(batch=2, new_tokens=4, temperature=1.0, beta=1.0, threads=1, steps=3,
                         skip=1, repeats=1, loss_beta=0.5),
        "step": [{"vocab": 105, "opd": side, "trl": side, "speedup_tokens_per_s": 1.0,
                  "speedup_tokens_per_cpu_s": 1.0, "peak_ratio": 1.0}],
        "loss": [{"n": 8, "mode": "opd_chunked", "peak_mb": 1.0, "seconds": 0.1,
                  "max_abs_diff": 0.0}],
    }
    text = speed_markdown(result)
    assert "| opd | 0.500 |" in text and "DistillationTrainer" in text and "opd_chunked" in text


def test_quality_report_without_matplotlib_says_so(monkeypatch, tmp_path):
    import sys

    from opd.bench import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    assert plots.plot({}, tmp_path / "x.png") is None


def _bench_imports() -> dict[str, tuple[set, list]]:
    """Per opd.bench module: the opd.bench modules it imports, and its function-level
    imports of opd modules (line numbers), read from the source with `ast`."""
    import ast
    from pathlib import Path

    import opd.bench

    folder = Path(opd.bench.__file__).parent
    out = {}
    for path in sorted(folder.glob("*.py")):
        name = "opd.bench" if path.stem == "__init__" else f"opd.bench.{path.stem}"
        tree = ast.parse(path.read_text())
        deps, nested = set(), []
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            deps |= {m for m in mods if m.startswith("opd.bench.") and m != name}
            if id(node) not in top and any(m.startswith("opd") for m in mods):
                nested.append(node.lineno)
        out[name] = (deps, nested)
    return out


def test_bench_modules_import_one_way_at_module_level():
    graph = _bench_imports()
    assert {"opd.bench.plots", "opd.bench.quality", "opd.bench.speed"} <= set(graph)
    # plots renders reports; it imports no benchmark.
    assert not graph["opd.bench.plots"][0] & {"opd.bench.quality", "opd.bench.speed"}
    # No opd import hides inside a function (only optional libraries such as trl may).
    assert {m: lines for m, (_, lines) in graph.items() if lines} == {}
    # No cycle among the modules: a depth-first search never meets a module on its path.
    def visit(mod, path):
        assert mod not in path, " -> ".join([*path, mod])
        for dep in graph.get(mod, (set(), []))[0]:
            visit(dep, [*path, mod])

    for mod in graph:
        visit(mod, [])


@pytest.mark.slow
def test_spawned_loss_worker_runs_through_python_m_opd_bench(tmp_path):
    # The speed benchmark's fresh processes: `python -m opd.bench speed --worker loss ...`.
    out = speed._spawn(["loss", "--mode", "opd_chunked", "--n", "2", "--beta", "0.5",
                        "--chunk-size", "2", "--threads", "1",
                        "--values-out", str(tmp_path / "v.pt")])  # fmt: skip
    assert out["mode"] == "opd_chunked" and out["n"] == 2 and out["seconds"] > 0
    assert torch.load(tmp_path / "v.pt").shape == (2,)


def test_python_m_opd_bench_names_the_benchmarks(capsys):
    from opd.bench.__main__ import main

    assert main([]) == 2 and "{quality,speed,scaling}" in capsys.readouterr().err
