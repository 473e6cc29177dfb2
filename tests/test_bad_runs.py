"""Bad checkpoints and output folders through the real CLI: one clear line, nothing changed.

Each case starts from a copy of one small run stopped after step 2 (checkpoints step 1 and
step 2 kept), damages it, and runs `opd distill`. Error cases: exit 2, one `opd: error:` line
naming the problem, no traceback, the run folder byte for byte unchanged. Fallback cases (a
damaged newest checkpoint): a warning naming the file, then the run resumes from step 1 and
finishes.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from tests.helpers import (
    assert_clean_error,
    run_opd,
    save_tiny_models,
    small_cli_args,
    tree_digest,
    write_prompts,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(models folder pair, prompt file, a run folder stopped after step 2 of 3)."""
    root = tmp_path_factory.mktemp("base")
    dirs = save_tiny_models(root / "models")
    data = write_prompts(root / "prompts.jsonl", 12)
    args = small_cli_args(root, dirs, data, "train.steps=3", "train.checkpoint_every=1")
    res = run_opd(["distill", *args, "--stop-after", "2", "--no-report"])
    assert res.code == 0, res.err + (res.traceback or "")
    return dirs, data, root / "run"


@pytest.fixture
def run(base, tmp_path):
    shutil.copytree(base[2], tmp_path / "run")
    return tmp_path / "run"


def _truncate(path):
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def _corrupt_all(run):
    for d in (run / "checkpoints").glob("step_*"):
        _truncate(d / "student.safetensors")


def _link_latest_outside(run):
    (run / "checkpoints" / "latest").unlink()
    os.symlink(run.parent, run / "checkpoints" / "latest")


def _pointer_outside(run):
    (run / "checkpoints" / "latest").write_text("../../elsewhere\n")


def _step_link_outside(run):
    (run.parent / "outside").mkdir()
    os.symlink(run.parent / "outside", run / "checkpoints" / "step_000009")


ERRORS = {
    "all-checkpoints-corrupt": (_corrupt_all, [], ("no usable checkpoint", "student.safetensors")),
    "latest-symlink-outside": (_link_latest_outside, [], ("latest", "outside the run folder")),
    "latest-pointer-outside": (_pointer_outside, [], ("../../elsewhere", "outside")),
    "step-link-outside": (_step_link_outside, [], ("step_000009", "outside the run folder")),
    "step-past-train-steps": (None, ["train.steps=1"], ("step 2", "train.steps=1")),
    "different-architecture": (None, ["STUDENT"], ("different student architecture",)),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_resume_is_a_clean_error(base, run, tmp_path, case):
    damage, extra, needles = ERRORS[case]
    if damage:
        damage(run)
    if extra == ["STUDENT"]:  # the student folder the run names now holds another width
        from opd.tiny import char_tokenizer, tiny_llama

        student = run.parent / "student-replaced"
        tiny_llama(len(char_tokenizer()), hidden=32, layers=2, seed=5).save_pretrained(student)
        char_tokenizer().save_pretrained(student)
        cfg = run / "config.yaml"  # (overriding model.student on --resume is refused earlier)
        cfg.write_text(cfg.read_text().replace(str(base[0][1]), str(student)))
        extra = []
    before = tree_digest(run)
    res = run_opd(["distill", "--resume", str(run), *extra, "train.progress=false"])
    assert_clean_error(res, *needles)
    assert tree_digest(run) == before


FALLBACKS = {
    "truncated-safetensors": ("student.safetensors", _truncate),
    "bad-json": ("state.json", lambda p: p.write_text("{not json")),
    "state-missing-keys": ("state.json", lambda p: p.write_text('{"step": 2}')),
    "truncated-optimizer": ("optimizer.pt", _truncate),
    "missing-rng": ("rng.safetensors", lambda p: p.unlink()),
    "empty-optimizer": ("optimizer.pt", lambda p: p.write_bytes(b"")),
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(run, case):
    name, damage = FALLBACKS[case]
    damage(run / "checkpoints" / "step_000002" / name)
    kept = tree_digest(run / "checkpoints" / "step_000001")
    res = run_opd(["distill", "--resume", str(run), "--no-report"])
    assert res.code == 0 and res.traceback is None, res.err + (res.traceback or "")
    warning = [ln for ln in res.out.splitlines() if ln.startswith("warning:") and "step_" in ln]
    assert len(warning) == 1 and name in warning[0] and "step_000002" in warning[0], res.out
    assert "resumed from" in res.out and "step 1" in res.out
    assert (run / "student").is_dir()
    assert kept  # the fallback was read, not rewritten
    from opd.logs import read_metrics

    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]


def _make_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    return tmp_path / "afile"


OUTPUT_DIRS = {
    "is-a-file": (lambda t: _make_file(t), ("is a file",)),
    "under-a-file": (lambda t: _make_file(t) / "sub" / "run", ("which is a file",)),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_DIRS))
def test_bad_output_dir(base, tmp_path, case):
    dirs, data, _ = base
    make, needles = OUTPUT_DIRS[case]
    out = make(tmp_path)
    before = tree_digest(tmp_path)
    res = run_opd(["distill", *small_cli_args(tmp_path, dirs, data), f"output_dir={out}"])
    assert_clean_error(res, str(out), *needles)
    assert tree_digest(tmp_path) == before


def test_output_dir_not_writable(base, tmp_path, monkeypatch):
    dirs, data, _ = base
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(tmp_path) else real(p, m))
    res = run_opd(["distill", *small_cli_args(tmp_path, dirs, data)])
    assert_clean_error(res, "not writable", str(tmp_path))
    assert not (tmp_path / "run").exists()


def test_output_dir_mkdir_fails(base, tmp_path, monkeypatch):
    """The folder cannot be made although the parent looked writable (e.g. a read-only mount)."""
    from pathlib import Path

    dirs, data, _ = base
    real = Path.mkdir

    def refuse(self, *a, **k):
        if self == tmp_path / "run":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refuse)
    res = run_opd(["distill", *small_cli_args(tmp_path, dirs, data)])
    assert_clean_error(res, "cannot be written", "permission denied")


def test_resume_of_a_folder_that_is_no_run(tmp_path):
    (tmp_path / "notarun").mkdir()
    res = run_opd(["distill", "--resume", str(tmp_path / "notarun")])
    assert_clean_error(res, "not a run folder", "config.yaml")


def test_existing_run_without_resume(base, run):
    dirs, data, _ = base
    before = tree_digest(run)
    res = run_opd(["distill", *small_cli_args(run.parent, dirs, data)])
    assert_clean_error(res, "already holds a run", "--resume")
    assert tree_digest(run) == before


def test_failed_validation_leaves_no_run_folder(base, tmp_path):
    dirs, data, _ = base
    res = run_opd(["distill", *small_cli_args(tmp_path, dirs, data), "data.train=missing.jsonl"])
    assert res.code == 2 and res.traceback is None
    assert not (tmp_path / "run").exists()


def test_disk_full_while_checkpointing(base, tmp_path, monkeypatch):
    """ENOSPC while writing the checkpoint of step 2: a clear error, step 1 still resumes."""
    import opd.checkpoint as ckpt_mod

    dirs, data, _ = base
    real, calls = ckpt_mod.save_file, []

    def full_disk(tensors, path, *a, **k):
        calls.append(path)
        if "step_000002" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", full_disk)
    args = small_cli_args(tmp_path, dirs, data, "train.steps=3", "train.checkpoint_every=1")
    res = run_opd(["distill", *args])
    assert_clean_error(res, "step_000002", "no space left", "step_000001 is unchanged", "--resume")
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000001"]
    monkeypatch.setattr(ckpt_mod, "save_file", real)
    res = run_opd(["distill", "--resume", str(run), "--no-report"])
    assert res.code == 0, res.err + (res.traceback or "")
    assert "resumed from" in res.out and "step 1" in res.out


def test_a_failed_start_leaves_no_made_up_run_folder(tmp_path, monkeypatch, prompt_file):
    """With no output_dir, the folder name is claimed by creating it; a start that fails
    (here: a data file that does not exist) removes it again."""
    monkeypatch.chdir(tmp_path)
    t, s = save_tiny_models(tmp_path / "models")
    args = [
        a for a in small_cli_args(tmp_path, (t, s), prompt_file) if not a.startswith("output_dir=")
    ]
    args = [a if not a.startswith("data.train=") else "data.train=missing.jsonl" for a in args]
    assert_clean_error(run_opd(["distill", *args]), "missing.jsonl")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
