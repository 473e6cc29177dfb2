"""Tests for opd.data: loading, row checks, encoding, batching, splitting."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys

import pytest

from opd.data import (
    EncodeResult,
    Example,
    Row,
    encode_rows,
    end_of_turn_ids,
    load_rows,
)
from opd.errors import ConfigError, DataError
from opd.stream import PromptStream, split_rows
from opd.tiny import IM_END, char_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
RECORDS = [
    {"prompt": "Say hi.", "answer": 7},
    {"prompt": "Count: 1 2", "completion": " 3", "extra": "ignored"},
    {"messages": CHAT, "answer": "4"},
]


def _fields(row: Row) -> tuple:
    return (row.prompt, row.messages, row.completion, row.answer)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _write(tmp_path, fmt: str):
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        return _write_jsonl(path, RECORDS)
    if fmt == "json":
        path.write_text(json.dumps({"data": RECORDS}))
        return path
    columns = ["prompt", "messages", "completion", "answer", "extra"]
    if fmt == "csv":
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for r in RECORDS:
                cells = {**r, "messages": json.dumps(r["messages"]) if "messages" in r else ""}
                w.writerow([cells.get(c, "") for c in columns])
        return path
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    # Parquet columns are typed: the answers go in as strings (JSON keeps 7 a number).
    table = pa.table({c: [r.get(c) for r in RECORDS] for c in columns if c != "answer"})
    table = table.append_column(
        "answer", pa.array([str(r.get("answer")) if "answer" in r else None for r in RECORDS])
    )
    pq.write_table(table, path)
    return path


# ---------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_every_format_loads_the_same_rows(tmp_path, fmt):
    result = load_rows(_write(tmp_path, fmt))
    assert result.skipped == 0 and result.skipped_examples == []
    assert [_fields(r) for r in result.rows] == [
        ("Say hi.", None, None, "7"),
        ("Count: 1 2", None, " 3", None),
        (None, tuple(CHAT[:2]), "4", "4"),
    ]


def test_sources_name_file_and_line_or_row(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")
    assert [r.source for r in load_rows(jsonl).rows] == ["a.jsonl:1", "a.jsonl:3"]
    assert [r.source for r in load_rows(_write(tmp_path, "csv")).rows][0] == "data.csv:2"
    assert [r.source for r in load_rows(_write(tmp_path, "json")).rows][2] == "data.json:row 3"


def test_final_assistant_turn_becomes_completion_unless_given(tmp_path):
    path = _write_jsonl(
        tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": CHAT, "completion": "four"}]
    )
    first, second = load_rows(path).rows
    assert first.messages == tuple(CHAT[:2]) and first.completion == "4"
    assert second.messages == tuple(CHAT) and second.completion == "four"


def test_json_top_level_list_and_limit(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps(RECORDS))
    assert len(load_rows(path).rows) == 3
    assert len(load_rows(path, limit=2).rows) == 2


BAD_ROWS = [
    # (line content, substring naming the field, substring of what would be valid)
    ({"prompt": 5}, "field 'prompt' must be a non-empty string, got int", "chat list"),
    ({"prompt": "  "}, "field 'prompt'", "valid: a string"),
    ({"text": "hi"}, "neither field 'prompt' nor field 'messages'", "exactly one"),
    ({"prompt": "a", "messages": CHAT}, "both field 'prompt' and field 'messages'", "exactly one"),
    ({"messages": "hi"}, "field 'messages' must be a non-empty chat list", '"role"'),
    ({"messages": []}, "field 'messages'", '"content"'),
    ({"messages": ["hi"]}, "field 'messages[0]' must be an object", "valid"),
    ({"messages": [{"content": "x"}]}, "field 'messages[0].role'", "'user'"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "field 'messages[0].role'", "got 'tool'"),
    ({"messages": [{"role": "user"}]}, "field 'messages[0].content' must be a string", "valid"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "field 'messages'", "user"),
    ({"prompt": "a", "completion": 3}, "field 'completion' must be a string, got int", "valid"),
    ({"prompt": "a", "answer": [1]}, "field 'answer' must be a string or number", "valid"),
    ({"prompt": "a", "answer": True}, "field 'answer'", "got bool"),
    ([1, 2], "row must be an object with 'prompt' or 'messages', got list", "prompt"),
]


@pytest.mark.parametrize("record, field, valid", BAD_ROWS)
def test_bad_row_names_file_line_and_field(tmp_path, record, field, valid):
    path = _write_jsonl(tmp_path / "data.jsonl", [RECORDS[0], RECORDS[1], record])
    with pytest.raises(DataError) as err:
        load_rows(path)
    msg = str(err.value)
    assert msg.startswith("data.jsonl:3: ")
    assert field in msg and valid in msg
    assert "\n" not in msg


def test_bad_row_positions_in_other_formats(tmp_path):
    js = tmp_path / "rows.json"
    js.write_text(json.dumps([RECORDS[0], {"prompt": 1}]))
    with pytest.raises(DataError, match=r"^rows\.json:row 2: field 'prompt'"):
        load_rows(js)
    cs = tmp_path / "rows.csv"
    cs.write_text('prompt,messages\nhi,\n,"not json"\n')
    with pytest.raises(DataError, match=r"^rows\.csv:3: field 'messages'"):
        load_rows(cs)


def test_invalid_json_line_names_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"^data\.jsonl:2: invalid JSON"):
        load_rows(path)


def test_skip_bad_rows_counts_and_keeps_five_examples(tmp_path):
    bad = [{"prompt": i} for i in range(7)]
    path = _write_jsonl(tmp_path / "s.jsonl", [RECORDS[0], *bad, RECORDS[1]])
    path.write_text(path.read_text() + "{oops\n")
    result = load_rows(path, skip_bad_rows=True)
    assert [r.prompt for r in result.rows] == ["Say hi.", "Count: 1 2"]
    assert result.skipped == 8
    assert len(result.skipped_examples) == 5
    assert result.skipped_examples[0].startswith("s.jsonl:2: field 'prompt'")


def test_all_rows_skipped_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": 1}, {"x": 2}])
    with pytest.raises(DataError, match="all 2 rows"):
        load_rows(path, skip_bad_rows=True)


@pytest.mark.parametrize("name, text", [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "")])
def test_empty_file_is_an_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match="no rows"):
        load_rows(path)


def test_missing_file_and_unknown_extension(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="not found") as err:
        load_rows(missing)
    assert str(missing) in str(err.value)
    txt = tmp_path / "p.txt"
    txt.write_text("hi")
    with pytest.raises(DataError, match=r"\.jsonl, \.json, \.csv, \.parquet"):
        load_rows(txt)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(DataError, match="pip install pyarrow"):
        load_rows(path)


def test_non_utf8_file_is_a_data_error(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="latin.jsonl"):
        load_rows(path)


# ---------------------------------------------------------------------------- encoding


def _rows(*prompts: str, completion: str | None = None) -> list[Row]:
    return [Row(p, None, completion, None, f"mem:{i}") for i, p in enumerate(prompts, 1)]


def test_chat_template_encoding_round_trips():
    tok = char_tokenizer()
    row = Row(None, tuple(CHAT[:2]), "4", "4", "x.jsonl:1")
    result = encode_rows([*_rows("hi"), row], tok)
    assert isinstance(result, EncodeResult) and result.truncated == 0
    plain, chat = result.examples
    expected = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert plain.prompt_text == expected
    assert tok.decode(list(plain.prompt_ids)) == expected
    rendered = tok.apply_chat_template(list(CHAT[:2]), add_generation_prompt=True, tokenize=False)
    assert tok.decode(list(chat.prompt_ids)) == rendered == chat.prompt_text
    assert chat.answer == "4" and chat.source == "x.jsonl:1"


def test_system_prompt_is_prepended():
    tok = char_tokenizer()
    (ex,) = encode_rows(_rows("hi"), tok, system_prompt="Be nice.").examples
    assert ex.prompt_text.startswith("<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user")
    (ex,) = encode_rows(_rows("hi"), tok, use_chat_template=False, system_prompt="S").examples
    assert ex.prompt_text == "S\n\nhi"


def test_completion_ends_with_end_of_turn_or_eos():
    tok = char_tokenizer()
    im_end = tok.convert_tokens_to_ids(IM_END)
    (chat,) = encode_rows(_rows("q", completion="ab"), tok).examples
    assert chat.completion_ids == (*tok("ab", add_special_tokens=False).input_ids, im_end)
    (plain,) = encode_rows(_rows("q", completion="ab"), tok, use_chat_template=False).examples
    assert plain.completion_ids[-1] == tok.eos_token_id
    assert plain.prompt_ids == tuple(tok("q", add_special_tokens=True).input_ids)
    assert plain.prompt_text == "q"
    (none,) = encode_rows(_rows("q"), tok).examples
    assert none.completion_ids is None


def test_chat_template_required_or_missing():
    tok = char_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match=r"^data\.chat_template=true but the tok") as err:
        encode_rows(_rows("q"), tok, use_chat_template=True)
    assert "use_chat_template" not in str(err.value)  # the config key the user can set
    assert "data.chat_template=auto or false" in str(err.value)
    (ex,) = encode_rows(_rows("q", completion="a"), tok).examples  # "auto" falls back
    assert ex.prompt_text == "q" and ex.completion_ids[-1] == tok.eos_token_id
    msg_row = Row(None, tuple(CHAT[:2]), None, None, "m.jsonl:4")
    with pytest.raises(
        DataError,
        match=r"^m\.jsonl:4: a chat-list row needs a chat template, but data\.chat_template",
    ):
        encode_rows([msg_row], tok)


def test_left_truncation_keeps_last_tokens_and_counts():
    tok = char_tokenizer()
    rows = _rows("abcdefghij", "xy")
    result = encode_rows(rows, tok, max_prompt_tokens=4, use_chat_template=False)
    assert result.truncated == 1
    assert tok.decode(list(result.examples[0].prompt_ids)) == "ghij"
    assert result.examples[0].prompt_text == "ghij"
    assert tok.decode(list(result.examples[1].prompt_ids)) == "xy"
    full = encode_rows(rows[:1], tok).examples[0]
    chat = encode_rows(rows[:1], tok, max_prompt_tokens=12).examples[0]
    assert chat.prompt_ids == full.prompt_ids[-12:]  # "\n", "<|im_start|>", "assistant\n"
    assert chat.prompt_text == "\n<|im_start|>assistant\n"


def test_truncation_error_names_row_length_and_option():
    tok = char_tokenizer()
    with pytest.raises(DataError) as err:
        encode_rows(_rows("ok", "abcdefghij"), tok, max_prompt_tokens=4, truncation="error",
                    use_chat_template=False)  # fmt: skip
    msg = str(err.value)
    assert msg.startswith("mem:2: prompt is 10 tokens")
    assert "max_prompt_tokens=4" in msg


@pytest.mark.parametrize(
    "kwargs",
    [{"max_prompt_tokens": 0}, {"truncation": "right"}, {"use_chat_template": "yes"}],
)
def test_bad_encode_options(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        encode_rows(_rows("q"), char_tokenizer(), **kwargs)


def test_end_of_turn_ids():
    tok = char_tokenizer()
    assert end_of_turn_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)]
    no_chat = char_tokenizer()
    no_chat.eos_token = IM_END  # eos and end-of-turn are the same token: listed once
    assert end_of_turn_ids(no_chat) == [no_chat.convert_tokens_to_ids(IM_END)]


# ---------------------------------------------------------------------------- batching


def _examples(n: int) -> list[Example]:
    return [Example((i,), None, None, f"mem:{i}", str(i)) for i in range(n)]


def _ids(batch: list[Example]) -> list[int]:
    return [ex.prompt_ids[0] for ex in batch]


def test_prompt_stream_is_deterministic_and_covers_each_epoch():
    examples = _examples(10)
    a = [_ids(next(PromptStream(examples, 4, seed=3))) for _ in range(2)]
    assert a[0] == a[1]
    stream = PromptStream(examples, 4, seed=3)
    first = [i for _ in range(5) for i in _ids(next(stream))]  # 20 = exactly two epochs
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    assert first[:10] != first[10:]  # a fresh shuffle each epoch
    state = stream.state_dict()
    assert (state["epoch"], state["index"], state["examples"]) == (2, 0, 10)
    assert state["fingerprint"] == PromptStream(examples, 4, seed=3).fingerprint()
    assert state["fingerprint"] != PromptStream(examples[:9], 4, seed=3).fingerprint()
    other = [i for _ in range(5) for i in _ids(next(PromptStream(examples, 4, seed=4)))]
    assert other != first
    ordered = PromptStream(examples, 3, seed=0, shuffle=False)
    assert [_ids(next(ordered)) for _ in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]]
    wide = PromptStream(_examples(2), 5, seed=0)  # a batch larger than an epoch
    assert sorted(_ids(next(wide))[:4]) == [0, 0, 1, 1] and wide.state_dict()["epoch"] == 2


def test_prompt_stream_resume_is_identical():
    examples = _examples(7)
    straight = PromptStream(examples, 3, seed=11)
    for _ in range(3):
        next(straight)
    state = straight.state_dict()
    assert (state["epoch"], state["index"]) == (1, 2)  # 9 examples consumed: epoch 0 and two more
    resumed = PromptStream(examples, 3, seed=11)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert [_ids(next(resumed)) for _ in range(6)] == [_ids(next(straight)) for _ in range(6)]


def test_prompt_stream_bad_arguments():
    with pytest.raises(ConfigError, match="batch_size"):
        PromptStream(_examples(3), 0, seed=0)
    with pytest.raises(DataError):
        PromptStream([], 2, seed=0)
    with pytest.raises(ConfigError, match="position 3 does not fit the 3 training prompts"):
        PromptStream(_examples(3), 2, seed=0).load_state_dict({"epoch": 0, "index": 3})


# ---------------------------------------------------------------------------- splitting


def test_split_rows_is_deterministic_and_disjoint():
    rows = list(range(20))
    train, held = split_rows(rows, eval_fraction=0.25, seed=1)
    assert len(held) == 5 and sorted(train + held) == rows
    assert train == sorted(train) and held == sorted(held)  # original order kept
    assert split_rows(rows, eval_fraction=0.25, seed=1) == (train, held)
    assert split_rows(rows, eval_count=5, seed=1) == (train, held)
    assert split_rows(rows, eval_count=5, seed=2) != (train, held)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"eval_fraction": 0.1, "eval_count": 1}, {"eval_fraction": 1.0}, {"eval_count": 3}],
)
def test_split_rows_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        split_rows([1, 2, 3], **kwargs)


def test_rows_and_examples_are_frozen():
    row = _rows("q")[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.prompt = "x"  # type: ignore[misc]
