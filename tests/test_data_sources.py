"""Where a run's prompts come from: the eval rule (data.eval follows data.train),
`PromptSets.describe()`, `datasets` folders and Hub names, and TRL's conversational rows."""

from __future__ import annotations

import json

import pytest

from opd.build import build_data
from opd.config import load_config
from opd.data import encode_rows, load_rows
from opd.errors import DataError
from opd.tiny import char_tokenizer
from opd.train import distill
from tests.helpers import fresh_models, tiny_cfg, write_prompts

datasets = pytest.importorskip("datasets")


def _cfg(*overrides):
    return load_config(None, ["data.chat_template=false", *overrides])


def _prompts(examples) -> list[str]:
    return [ex.prompt_text for ex in examples]


# ---------------------------------------------------------------------------- the eval rule


def test_eval_defaults_to_rows_held_out_from_the_users_file(tmp_path):
    assert load_config(None, []).data.eval == ""  # no longer the shipped arithmetic test set
    path = write_prompts(tmp_path / "mine.jsonl", n=100)
    sets = build_data(_cfg(f"data.train={path}", "data.eval_count=10"), char_tokenizer())
    assert len(sets.train) == 90 and len(sets.eval) == 10
    assert all(ex.source.startswith("mine.jsonl:") for ex in sets.train + sets.eval)
    assert not {ex.source for ex in sets.train} & {ex.source for ex in sets.eval}
    assert sets.task is None
    train_line, eval_line = sets.describe()
    assert train_line == f"train: {path} (90 of 100 rows)"
    assert eval_line.startswith(f"eval: held out from {path} (10 rows, chosen by train.seed=0;")
    assert "data.eval not given" in eval_line


def test_held_out_rows_depend_on_the_seed_only(tmp_path):
    path = write_prompts(tmp_path / "mine.jsonl", n=60)
    tok = char_tokenizer()
    held = [
        [ex.source for ex in build_data(_cfg(f"data.train={path}", f"train.seed={s}"), tok).eval]
        for s in (0, 0, 1)
    ]
    assert held[0] == held[1] != held[2]
    assert len(held[0]) == 12  # eval_count=32 is capped at a fifth of 60 rows
    # `opd eval` (need_train=False) evaluates on the same held-out rows as the run did
    only_eval = build_data(_cfg(f"data.train={path}"), tok, need_train=False)
    assert [ex.source for ex in only_eval.eval] == held[0]
    assert "capped at a fifth of 60 rows" in only_eval.describe()[1]


def test_no_data_train_uses_the_shipped_task_and_says_so():
    sets = build_data(_cfg("data.eval_count=5"), char_tokenizer())
    assert sets.describe() == [
        "train: shipped task 'arithmetic', split 'train' (500 rows; data.train not given)",
        "eval: shipped task 'arithmetic', split 'test' (first 5 of 100 rows; "
        "data.eval not given, follows data.train)",
    ]
    assert len(sets.train) == 500 and len(sets.eval) == 5 and sets.task is not None
    assert not set(_prompts(sets.train)) & set(_prompts(sets.eval))


def test_explicit_eval_and_eval_count_zero(tmp_path):
    train = write_prompts(tmp_path / "t.jsonl", n=20)
    ev = write_prompts(tmp_path / "e.jsonl", n=10, seed=1)
    sets = build_data(_cfg(f"data.train={train}", f"data.eval={ev}", "data.eval_count=4"),
                      char_tokenizer())  # fmt: skip
    assert sets.describe() == [f"train: {train} (20 rows)", f"eval: {ev} (first 4 of 10 rows)"]
    off = build_data(_cfg(f"data.train={train}", "data.eval_count=0"), char_tokenizer())
    assert len(off.train) == 20 and off.eval == []
    assert off.describe()[1] == "eval: none (data.eval_count=0)"


def test_one_row_file_holds_nothing_out(tmp_path):
    path = write_prompts(tmp_path / "one.jsonl", n=1)
    sets = build_data(_cfg(f"data.train={path}"), char_tokenizer())
    assert len(sets.train) == 1 and sets.eval == []
    assert "none to spare" in sets.describe()[1]


def test_skipped_rows_are_counted_in_describe(tmp_path):
    path = write_prompts(tmp_path / "s.jsonl", n=10)
    path.write_text(path.read_text() + '{"prompt": "\\ud800"}\n{"prompt": [[[[[' + "]" * 5 + "}\n")
    sets = build_data(_cfg(f"data.train={path}", "data.skip_bad_rows=true"), char_tokenizer())
    assert sets.skipped == 2 and "2 bad rows skipped" in sets.describe()[0]


# ---------------------------------------------------------------------------- datasets


def _dataset(n=12):
    return datasets.Dataset.from_list(
        [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(n)]
    )


def test_save_to_disk_folder_trains(tmp_path, tok):
    folder = tmp_path / "saved"
    _dataset().save_to_disk(str(folder))
    rows = load_rows(folder).rows
    assert [r.prompt for r in rows[:2]] == ["0+1=", "1+1="] and rows[0].source == "saved:row 1"
    cfg = tiny_cfg(tmp_path, folder, "data.eval=", "data.eval_count=2", "train.steps=2")
    result = distill(cfg, models=fresh_models(tok), log=lambda *_: None)
    assert len(result.losses) == 2 and len(result.data.train) == 10
    assert result.data.describe()[0] == f"train: {folder} (10 of 12 rows)"


def test_saved_dataset_dict_needs_a_split(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": _dataset(12), "test": _dataset(3)}).save_to_disk(str(folder))
    with pytest.raises(DataError, match=r"no split given \(valid: .*dd:train, .*dd:test\)"):
        load_rows(folder)
    sets = build_data(_cfg(f"data.train={folder}:train", f"data.eval={folder}:test"),
                      char_tokenizer())  # fmt: skip
    assert len(sets.train) == 12 and len(sets.eval) == 3
    assert sets.eval[0].source == "dd:test:row 1"
    with pytest.raises(DataError, match="no split 'valid'"):
        load_rows(folder, split="valid")


def test_hub_dataset_is_refused_offline_and_loaded_when_allowed(monkeypatch):
    import huggingface_hub.constants as hub_constants

    calls = []

    def fake_load_dataset(name, split):  # stands in for the Hub: no network in tests
        calls.append((name, split, datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE))
        return _dataset(10)

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as under `opd distill`
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = "hf:someone/prompts:train"
    with pytest.raises(DataError, match=r"downloads are off .*data\.allow_download=true"):
        build_data(_cfg(f"data.train={spec}"), char_tokenizer())
    assert calls == []
    sets = build_data(_cfg(f"data.train={spec}", "data.allow_download=true"), char_tokenizer())
    assert calls == [("someone/prompts", "train", False, False)]  # offline mode lifted...
    assert datasets.config.HF_HUB_OFFLINE and hub_constants.HF_HUB_OFFLINE  # ...for that call
    assert len(sets.train) == 8 and sets.train[0].source.startswith(f"{spec}:row ")


# ---------------------------------------------------------------------------- TRL rows

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "2+2?"}
ANSWER = {"role": "assistant", "content": "4"}


def test_trl_conversational_rows_encode_like_messages(tmp_path):
    path = tmp_path / "trl.jsonl"
    records = [
        {"prompt": [SYSTEM, USER]},  # prompt-only
        {"prompt": [SYSTEM, USER], "completion": [ANSWER]},  # prompt-completion
        {"messages": [SYSTEM, USER, ANSWER]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = load_rows(path).rows
    assert [r.prompt for r in rows] == [None] * 3
    assert rows[0].messages == rows[1].messages == rows[2].messages == (SYSTEM, USER)
    assert [r.completion for r in rows] == [None, "4", "4"]
    only, pair, msgs = encode_rows(rows, char_tokenizer()).examples
    assert only.prompt_ids == pair.prompt_ids == msgs.prompt_ids
    assert pair.completion_ids == msgs.completion_ids and only.completion_ids is None


def test_trl_chat_cells_in_csv(tmp_path):
    path = tmp_path / "trl.csv"
    path.write_text(
        "prompt,completion\n"
        + '"' + json.dumps([USER]).replace('"', '""') + '","' + json.dumps([ANSWER]).replace('"', '""') + '"\n'
        + '"[1, 2] + [3]",x\n'
        + '"[1, 2]",y\n'
    )  # fmt: skip
    chat, text, numbers = load_rows(path).rows
    assert chat.messages == (USER,) and chat.completion == "4"
    assert text.prompt == "[1, 2] + [3]" and text.completion == "x"
    assert numbers.prompt == "[1, 2]"  # JSON, but not a chat list: stays the prompt text
