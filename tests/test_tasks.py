"""Tests for opd.tasks: generators, verifiers, shipped files, and the teacher cache."""

from __future__ import annotations

import json

import pytest
import torch

from opd.errors import ConfigError
from opd.tasks import TASKS, get_task, load_shipped, shipped_path
from opd.tasks.shipped import build_shipped
from opd.tasks.teacher import (
    PRESETS,
    TeacherPreset,
    encode_sft_batch,
    evaluate_accuracy,
    generate_completions,
    train_task_teacher,
)
from opd.tiny import char_tokenizer, tiny_llama

ALL_TASKS = sorted(TASKS)
SYNTHETIC = ["brackets", "chain", "reverse", "sort"]


@pytest.mark.parametrize("name", ALL_TASKS)
def test_generate_is_deterministic_per_seed_and_prefix_stable(name):
    task = get_task(name)
    rows = task.generate(50, seed=3)
    assert rows == task.generate(50, seed=3)
    assert rows[:20] == task.generate(20, seed=3)
    assert rows != task.generate(50, seed=4)
    assert all(set(r) == {"prompt", "completion", "answer"} for r in rows)
    assert all(isinstance(v, str) and v for r in rows for v in r.values())


@pytest.mark.parametrize("name", ALL_TASKS)
def test_reference_completion_verifies_and_corrupted_answer_fails(name):
    task = get_task(name)
    for row in task.generate(200, seed=0):
        assert task.extract_answer(row["completion"]) == row["answer"]
        assert task.verify(row["completion"], row["answer"])
        # The answer with its last character changed (a digit +1, a letter/bracket swapped).
        last = row["answer"][-1]
        wrong = row["answer"][:-1] + {"9": "0", "z": "a", ")": "]", "]": "}", "}": ")"}.get(
            last, chr(ord(last) + 1)
        )
        assert not task.verify(row["completion"], wrong)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_prompts_are_short_ascii_lines(name):
    for row in get_task(name).generate(200, seed=1):
        assert row["prompt"].startswith(f"{name}: ") and row["prompt"].endswith("\n")
        assert row["prompt"].isascii() and row["completion"].isascii()
        assert "\n" not in row["completion"] and len(row["completion"]) <= 40


def test_arithmetic_extract_answer():
    task = get_task("arithmetic")
    assert task.extract_answer("3 + 4 = 7. The answer is 7.") == "7"
    assert task.extract_answer("The answer is 12, not 13.") == "12"
    assert task.extract_answer("the answer is: $1,000") == "1000"
    assert task.extract_answer("The answer is -3.") == "-3"
    assert task.extract_answer("He has 3 and then 5 apples") == "5"  # fallback: last integer
    assert task.extract_answer("The answer is 007") == "7"
    assert task.extract_answer("no numbers here") is None
    assert task.extract_answer("") is None
    assert task.verify("so 3 + 4 = 7", "7")
    assert not task.verify("The answer is 8. Or 7.", "7")


def test_synthetic_extract_answer():
    sort, chain = get_task("sort"), get_task("chain")
    brackets, reverse = get_task("brackets"), get_task("reverse")
    assert sort.extract_answer("  1  3 5 9\nsort: 2 1") == "1 3 5 9"
    assert sort.extract_answer("1 3 x 9") is None
    assert sort.extract_answer("") is None
    assert chain.extract_answer("3+4=7;7*2=14 => 14") == "14"
    assert chain.extract_answer("3+4=7;7*2=14") is None
    assert chain.extract_answer("1=>2 => 3\n=> 4") == "3"
    assert brackets.extract_answer(" ) ] }\n(") == ")]}"
    assert brackets.extract_answer(")]a") is None
    assert reverse.extract_answer("edcba\nxyz") == "edcba"
    assert reverse.extract_answer("edc ba") is None
    assert not reverse.verify("", "a")


def test_chain_is_left_to_right_and_in_range():
    task = get_task("chain")
    for row in task.generate(300, seed=2, steps=5, max_operand=9, max_value=40):
        expr = row["prompt"].removeprefix("chain: ").strip()
        value = int(expr[0])
        for op, b in zip(expr[1::2], expr[2::2]):
            value = {"+": value + int(b), "-": value - int(b), "*": value * int(b)}[op]
            assert 0 <= value <= 40
        assert row["answer"] == str(value)
        assert row["completion"].count(";") == 4


def test_brackets_prompt_plus_answer_is_balanced():
    pairs = {")": "(", "]": "[", "}": "{"}
    for row in get_task("brackets").generate(300, seed=5):
        stack = []
        for ch in row["prompt"].removeprefix("brackets: ").strip() + row["answer"]:
            if ch in pairs:
                assert stack.pop() == pairs[ch]
            else:
                stack.append(ch)
        assert stack == []


def test_knobs_change_difficulty():
    sort = get_task("sort")
    short = sort.generate(20, 0, length=3)
    long = sort.generate(20, 0, length=9, max_value=99)
    assert all(len(r["answer"].split()) == 3 for r in short)
    assert all(len(r["answer"].split()) == 9 for r in long)
    assert max(int(v) for r in long for v in r["answer"].split()) > 19
    chain = get_task("chain")
    assert all(r["completion"].count(";") == 5 for r in chain.generate(20, 0, steps=6))
    reverse = get_task("reverse")
    assert all(len(r["answer"]) == 12 for r in reverse.generate(20, 0, length=12))
    brackets = get_task("brackets")
    assert max(len(r["answer"]) for r in brackets.generate(200, 0, depth=2)) <= 2
    assert max(len(r["answer"]) for r in brackets.generate(200, 0, length=30, depth=12)) > 6
    arithmetic = get_task("arithmetic")
    assert all(r["completion"].count("=") == 1 for r in arithmetic.generate(50, 0, max_steps=1))


def test_bad_knobs_raise_config_error():
    with pytest.raises(ConfigError, match="valid knobs: length"):
        get_task("sort").generate(3, 0, size=4)
    with pytest.raises(ConfigError, match="integer >= 1"):
        get_task("reverse").generate(3, 0, length=0)
    with pytest.raises(ConfigError, match="max_steps"):
        get_task("arithmetic").generate(3, 0, max_steps=3)
    with pytest.raises(ConfigError, match="depth"):
        get_task("brackets").generate(3, 0, depth=1)


def test_get_task_error_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        get_task("sorting")
    message = str(err.value)
    assert "'sorting'" in message
    for name in ALL_TASKS:
        assert name in message


def test_shipped_arithmetic_files():
    train, test = load_shipped("arithmetic", "train"), load_shipped("arithmetic", "test")
    assert shipped_path("arithmetic", "train").is_file()
    assert len(train) == 500 and len(test) == 100
    train_prompts, test_prompts = {r["prompt"] for r in train}, {r["prompt"] for r in test}
    assert len(train_prompts) == 500 and len(test_prompts) == 100
    assert not train_prompts & test_prompts
    task = get_task("arithmetic")
    assert all(task.verify(r["completion"], r["answer"]) for r in train + test)
    # The files are exactly what the generator makes today.
    assert build_shipped("arithmetic") == {"test": test, "train": train}
    with pytest.raises(ConfigError, match="arithmetic/train"):
        shipped_path("sort", "train")


def test_encode_sft_batch_masks_prompt_and_padding():
    tok = char_tokenizer()
    rows = [{"prompt": "ab\n", "completion": "c"}, {"prompt": "a\n", "completion": "xyz"}]
    input_ids_BT, attention_mask_BT, labels_BT = encode_sft_batch(tok, rows)
    assert input_ids_BT.shape == (2, 6)
    assert attention_mask_BT.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    eos = tok.eos_token_id
    c, x, y, z = tok.convert_tokens_to_ids(["c", "x", "y", "z"])
    assert labels_BT.tolist() == [
        [-100, -100, -100, c, eos, -100],
        [-100, -100, x, y, z, eos],
    ]


def test_tiny_teacher_trains_caches_and_reloads(tmp_path):
    preset = TeacherPreset(hidden=32, layers=1, heads=2, steps=3, batch_size=8, warmup=1)
    kwargs = dict(cache_dir=tmp_path, preset=preset, eval_rows=8, progress=False)
    model, tok, info = train_task_teacher("reverse", knobs={"length": 3}, **kwargs)
    assert not info["cached"] and 0.0 <= info["accuracy"] <= 1.0
    assert info["steps"] == 3 and info["train_seconds"] >= 0 and info["params"] > 0
    folders = [p for p in tmp_path.iterdir()]
    assert len(folders) == 1 and folders[0].name.startswith("reverse-")
    assert (folders[0] / "model.safetensors").is_file()
    assert json.loads((folders[0] / "info.json").read_text())["accuracy"] == info["accuracy"]

    model2, tok2, info2 = train_task_teacher("reverse", knobs={"length": 3}, **kwargs)
    assert info2["cached"] and info2["accuracy"] == info["accuracy"]
    name, param = next(iter(model.state_dict().items()))
    torch.testing.assert_close(model2.state_dict()[name], param, rtol=0, atol=0)
    assert (
        tok2("ab!", add_special_tokens=False)["input_ids"]
        == tok("ab!", add_special_tokens=False)["input_ids"]
    )
    # Other settings hash to another folder.
    train_task_teacher("reverse", knobs={"length": 4}, **kwargs)
    assert len(list(tmp_path.iterdir())) == 2


def test_generate_completions_and_accuracy_on_tiny_model():
    tok = char_tokenizer()
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=2)
    rows = get_task("sort").generate(5, 0, length=2)
    texts = generate_completions(model, tok, [r["prompt"] for r in rows], 4, batch_size=2)
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)
    acc = evaluate_accuracy(model, tok, "sort", rows, batch_size=2)
    assert 0.0 <= acc <= 1.0
    assert evaluate_accuracy(model, tok, "sort", []) == 0.0
    assert tok.padding_side == "left" and model.training


def test_train_task_teacher_rejects_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="valid tasks"):
        train_task_teacher("nope", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="no teacher preset"):
        train_task_teacher("arithmetic", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="steps"):
        train_task_teacher("sort", steps=0, cache_dir=tmp_path)


def test_every_teacher_preset_builds():
    tok = char_tokenizer()
    assert set(PRESETS) == {*SYNTHETIC, "chain_fix", "sort_fix"}
    for name, preset in PRESETS.items():
        model = tiny_llama(len(tok), hidden=preset.hidden, layers=preset.layers, heads=preset.heads)
        assert sum(p.numel() for p in model.parameters()) < 2_000_000, name
        assert preset.warmup < preset.steps
