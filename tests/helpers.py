"""Test helpers shared across files: tiny configs, tiny models (in memory and saved as model
folders), prompt files, and the harness for the bad-input corpus (`run_opd`,
`assert_clean_error`, `tree_digest`)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import traceback
from dataclasses import dataclass
from pathlib import Path

from opd.build import finish_models
from opd.config import load_config
from opd.tiny import char_tokenizer, tiny_llama


def write_prompts(path, n=24, seed=0, completions=True, answers=True):
    """A JSONL of short addition prompts ('3+4=' -> '7')."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            row = {"prompt": f"{a}+{b}="}
            if completions:
                row["completion"] = str(a + b)
            if answers:
                row["answer"] = str(a + b)
            fh.write(json.dumps(row) + "\n")
    return path


def tiny_cfg(tmp_path, prompt_file, *extra, name="run"):
    """A RunConfig for a few-second run on tiny models (pass `models=fresh_models(tok)`)."""
    return load_config(
        None,
        [
            f"output_dir={tmp_path / name}",
            f"data.train={prompt_file}",
            f"data.eval={prompt_file}",
            "data.eval_count=8",
            "data.chat_template=false",
            "sampling.max_new_tokens=6",
            "train.batch_size=4",
            "train.progress=false",
            "train.lr=3e-3",
            *extra,
        ],
    )


def fresh_models(tok, seed=0):
    """Models(teacher 3×64, student 2×48) on the char tokenizer, vocabulary checked."""
    teacher = tiny_llama(len(tok), hidden=64, layers=3, seed=11)
    student = tiny_llama(len(tok), hidden=48, layers=2, seed=12 + seed)
    return finish_models(teacher, student, tok)


def save_tiny_models(folder: Path) -> tuple[Path, Path]:
    """Tiny teacher and student saved as Hugging Face folders (safetensors + tokenizer)."""
    tok = char_tokenizer()
    t = tiny_llama(len(tok), hidden=64, layers=3, seed=1)
    s = tiny_llama(len(tok), hidden=48, layers=2, seed=2)
    for name, m in (("teacher", t), ("student", s)):
        m.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    return folder / "teacher", folder / "student"


def small_cli_args(tmp_path, model_dirs, data, *extra):
    """`opd distill` overrides for a 2-step run on saved tiny models."""
    t, s = model_dirs
    return [
        f"model.teacher={t}",
        f"model.student={s}",
        f"data.train={data}",
        f"data.eval={data}",
        "data.eval_count=4",
        "train.steps=2",
        "train.batch_size=2",
        "sampling.max_new_tokens=4",
        "train.progress=false",
        f"output_dir={tmp_path / 'run'}",
        *extra,
    ]


# ---------------------------------------------------------------- the bad-input harness


@dataclass
class CliResult:
    code: int
    out: str
    err: str
    traceback: str | None  # set when an exception escaped `opd.cli.main`


def run_opd(argv: list[str]) -> CliResult:
    """Run `opd ARGV` in this process; capture stdout/stderr; never raises."""
    from opd.cli import main

    out, err = io.StringIO(), io.StringIO()
    tb = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a traceback is exactly what we test against
            tb = traceback.format_exc()
            code = 1
    return CliResult(code, out.getvalue(), err.getvalue(), tb)


def assert_clean_error(res: CliResult, *needles: str) -> str:
    """Exit code 2, exactly one line on stderr ('opd: error: ...'), no traceback, naming `needles`.

    Returns the error line (lower-cased needles are matched case-insensitively).
    """
    assert res.traceback is None, f"traceback instead of a clear error:\n{res.traceback}"
    assert "Traceback" not in res.err, res.err
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("opd: error:")]
    assert res.code == 2, f"exit code {res.code}, stderr: {res.err!r}"
    assert len(errors) == 1, f"expected one 'opd: error:' line, stderr: {res.err!r}"
    assert len(lines) == 1, f"stderr holds more than the error line: {res.err!r}"
    line = errors[0]
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not named in: {line}"
    return line


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative paths), to show nothing was changed."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_describes(method) -> None:
    """`Method.describe()` names each of the method's own parts on its own line."""
    lines = method.describe().splitlines()
    heads = [ln.split(":", 1)[0] for ln in lines]
    assert heads[:5] == ["prefixes", "teacher", "signal", "weights", "reduction"], lines
    assert lines[0].endswith(method.prefixes.describe())
    assert lines[1].endswith(method.teacher.describe())
    assert lines[2].endswith(method.signal.describe())
    assert lines[4].endswith(method.reduction)
    if method.prompts is not None:
        assert lines[5] == f"prompts:   {method.prompts.describe()}"


def write_privileged_prompts(path, n=24, seed=0, fields=("solution", "context")):
    """`write_prompts` rows that also carry privileged fields for self-teachers (the answer
    as `solution`, a hint as `context`); other recipes ignore the extra fields."""
    write_prompts(path, n, seed)
    rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
    with open(path, "w") as fh:
        for row in rows:
            extra = {"solution": f"={row['answer']}", "context": "add the digits"}
            fh.write(json.dumps({**row, **{k: extra[k] for k in fields}}) + "\n")
    return path
