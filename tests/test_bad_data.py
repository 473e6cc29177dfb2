"""Bad-input corpus for prompt data: each bad file goes through the real CLI (`opd distill`)
and must end with exit code 2 and one `opd: error:` line naming the file (and the line and
field where there is one), with no traceback; the models and the data file are unchanged and
no run was written (no metrics.jsonl, no checkpoint)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import assert_clean_error, run_opd, save_tiny_models, small_cli_args, tree_digest

GOOD = json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n"
CHAT = [{"role": "user", "content": "hi"}]


def _jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _nested(depth: int) -> str:
    return '{"prompt": ' + "[" * depth + "]" * depth + "}\n"


# (file name, content: str | bytes | None for "make it in the test", needles beyond the name)
CASES = [
    ("bad_json.jsonl", GOOD + '{"prompt": \n', ["bad_json.jsonl:2", "invalid JSON"]),
    ("prompt_int.jsonl", _jsonl({"prompt": 5}), ["prompt_int.jsonl:1", "'prompt'"]),
    ("empty_prompt.jsonl", GOOD + _jsonl({"prompt": "  "}), ["empty_prompt.jsonl:2", "'prompt'"]),
    ("missing_prompt.jsonl", _jsonl({"text": "hi"}), ["missing_prompt.jsonl:1", "'prompt'"]),
    ("both.jsonl", _jsonl({"prompt": "a", "messages": CHAT}), ["both.jsonl:1", "exactly one"]),
    ("not_object.jsonl", _jsonl([1, 2]), ["not_object.jsonl:1", "object"]),
    (
        "bad_role.jsonl",
        _jsonl({"messages": [{"role": "tool", "content": "x"}]}),
        ["bad_role.jsonl:1", "messages[0].role", "'user'"],
    ),
    (
        "content_int.jsonl",
        _jsonl({"messages": [{"role": "user", "content": 3}]}),
        ["content_int.jsonl:1", "messages[0].content"],
    ),
    (
        "assistant_only.jsonl",
        _jsonl({"messages": [{"role": "assistant", "content": "x"}]}),
        ["assistant_only.jsonl:1", "'messages'"],
    ),
    (
        "trl_prompt_role.jsonl",
        _jsonl({"prompt": [{"role": "bot", "content": "x"}]}),
        ["trl_prompt_role.jsonl:1", "prompt[0].role"],
    ),
    ("trl_prompt_empty.jsonl", _jsonl({"prompt": []}), ["trl_prompt_empty.jsonl:1", "'prompt'"]),
    (
        "trl_completion_user.jsonl",
        _jsonl({"prompt": CHAT, "completion": [{"role": "user", "content": "x"}]}),
        ["trl_completion_user.jsonl:1", "'completion'", "one assistant message"],
    ),
    (
        "completion_int.jsonl",
        _jsonl({"prompt": "a", "completion": 3}),
        ["completion_int.jsonl:1", "'completion'"],
    ),
    (
        "answer_list.jsonl",
        _jsonl({"prompt": "a", "answer": [1]}),
        ["answer_list.jsonl:1", "answer"],
    ),
    ("empty.jsonl", "", ["no rows"]),
    ("blank.jsonl", "\n\n  \n", ["no rows"]),
    ("empty.json", "[]", ["no rows"]),
    ("scalar.json", '"hi"', ["top level is str"]),
    ("broken.json", '[{"prompt": "a"},\n', ["broken.json:2", "invalid JSON"]),
    ("empty.csv", "", ["no rows"]),
    ("bad_messages.csv", 'prompt,messages\n,"not json"\n', ["bad_messages.csv:2", "'messages'"]),
    ("no_prompt_column.csv", "text\nhello\n", ["no_prompt_column.csv:2", "'prompt'"]),
    ("latin1.jsonl", '{"prompt": "caf\xe9"}\n'.encode("latin-1"), ["latin1.jsonl:1", "UTF-8"]),
    ("latin1.csv", "prompt\ncaf\xe9\n".encode("latin-1"), ["latin1.csv:2", "UTF-8"]),
    ("latin1.json", '[{"prompt": "caf\xe9"}]'.encode("latin-1"), ["latin1.json:1", "UTF-8"]),
    (
        "surrogate.jsonl",
        GOOD + '{"prompt": "a\\ud800b"}\n',
        ["surrogate.jsonl:2", "'prompt'", "surrogate"],
    ),
    (
        "surrogate_chat.jsonl",
        '{"messages": [{"role": "user", "content": "\\udfff"}]}\n',
        ["surrogate_chat.jsonl:1", "messages[0]", "surrogate"],
    ),
    ("nested.jsonl", GOOD + _nested(100_000), ["nested.jsonl:2", "'prompt'", "nested"]),
    ("nested.json", "[" * 100_000 + "]" * 100_000, ["nested.json", "nested"]),
    ("prompts.txt", "hello\n", ["unknown prompt file extension", ".jsonl"]),
    ("corrupt.parquet", b"PAR1 not really parquet", ["unreadable parquet"]),
    ("missing.jsonl", None, ["not found"]),
    ("a_directory.jsonl", None, ["is a directory"]),
    ("unreadable.jsonl", None, ["cannot read"]),
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def _make(path: Path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif path.name == "a_directory.jsonl":
        path.mkdir()
    elif path.name == "unreadable.jsonl":
        if not sys.platform.startswith("linux"):
            pytest.skip("/proc/self/mem is Linux only")
        path.symlink_to("/proc/self/mem")  # opens, but every read fails (EIO), even as root


def _data_digest(folder: Path) -> dict[str, str]:
    """`tree_digest` of the data folder; {} when it holds the unreadable-file symlink."""
    return {} if any(p.is_symlink() for p in folder.iterdir()) else tree_digest(folder)


def _check_failed_cleanly(tmp_path, model_dirs, data: Path, extra=(), needles=()) -> str:
    before = tree_digest(model_dirs[0].parent), _data_digest(tmp_path / "data")
    res = run_opd(["distill", *small_cli_args(tmp_path, model_dirs, data, *extra)])
    line = assert_clean_error(res, *needles)
    assert (tree_digest(model_dirs[0].parent), _data_digest(tmp_path / "data")) == before
    run = tmp_path / "run"
    # Nothing of a run is written. (The loop still writes config.yaml before loading data;
    # validating before creating the folder is the loop's part of issue 8 item 16.)
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    assert {p.name for p in run.iterdir()} <= {"config.yaml"} if run.exists() else True
    return line


@pytest.mark.parametrize("name, content, needles", CASES, ids=[c[0] for c in CASES])
def test_bad_data_file_is_one_clear_error(tmp_path, model_dirs, name, content, needles):
    (tmp_path / "data").mkdir()
    data = tmp_path / "data" / name
    _make(data, content)
    line = _check_failed_cleanly(tmp_path, model_dirs, data, needles=[name, *needles])
    assert len(line) < 400, line


def test_skip_bad_rows_still_refuses_an_unreadable_file(tmp_path, model_dirs):
    (tmp_path / "data").mkdir()
    data = tmp_path / "data" / "latin1.json"
    data.write_bytes('[{"prompt": "caf\xe9"}]'.encode("latin-1"))
    res_line = _check_failed_cleanly(
        tmp_path, model_dirs, data, ["data.skip_bad_rows=true"], ["latin1.json:1", "UTF-8"]
    )
    assert "skip" not in res_line


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("hf:someone/prompts:train", ["hf:someone/prompts:train", "data.allow_download=true"]),
        ("hf:someone/prompts", ["hf:ORG/NAME:SPLIT"]),
        ("", ["data.train is empty"]),
    ],
)
def test_bad_sources_are_clear_errors(tmp_path, model_dirs, spec, needles):
    (tmp_path / "data").mkdir()
    res = run_opd(["distill", *small_cli_args(tmp_path, model_dirs, "x"), f"data.train={spec}",
                   "data.eval="])  # fmt: skip
    assert_clean_error(res, *needles)


def test_truncation_error_names_the_row(tmp_path, model_dirs):
    (tmp_path / "data").mkdir()
    data = tmp_path / "data" / "long.jsonl"
    data.write_text(GOOD + _jsonl({"prompt": "word " * 5000}))
    extra = ["data.truncation=error", "data.max_prompt_tokens=64", "data.chat_template=false"]
    _check_failed_cleanly(tmp_path, model_dirs, data, extra, ["long.jsonl:2", "max_prompt_tokens"])
