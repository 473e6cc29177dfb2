"""Limits of prompt data: bounded work on huge lines (the kept tokens equal full tokenisation
plus left truncation), lone surrogates and deep nesting as row errors (skippable), unreadable
files and directories as one-line errors."""

from __future__ import annotations

import json
import os
import time

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from opd.data import Row, encode_rows, load_rows
from opd.data.encode import cut_to_budget
from opd.errors import DataError
from opd.tiny import CHATML_TEMPLATE, char_tokenizer
from tests.helpers import assert_clean_error, run_opd, save_tiny_models, small_cli_args

WORDS = "the quick brown fox jumps over the lazy dog ,.;!? 0123456789 ".split(" ")


def _bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with real merges (long runs of letters, spaces and digits merge)."""
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    text = [" ".join(WORDS) * 3, "aaaa" * 50, " " * 160, "\n\n\n" * 9, "1234567890" * 5]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(text * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _mixed_text(n_chars: int) -> str:
    """Words, with long runs of one letter, of spaces, of newlines and of digits."""
    parts, i = [], 0
    while sum(map(len, parts)) < n_chars:
        parts.append(" ".join(WORDS[(i + k) % len(WORDS)] for k in range(40)))
        parts.append([" " + "a" * 3000, " " * 2000, "\n" * 500, " 1234567890" * 30][i % 4])
        i += 1
    return "".join(parts)


@pytest.mark.parametrize("chat", [False, True])
def test_cut_keeps_what_full_tokenisation_keeps(chat):
    tok = _bpe_tokenizer()
    text = _mixed_text(200_000)
    for end in (len(text), len(text) - 2500, len(text) - 4100, len(text) - 7000):
        row = Row(text[:end], None, None, None, "x")
        turns = [{"role": "user", "content": row.prompt}]
        if chat:
            full = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
            full = list(full["input_ids"] if hasattr(full, "keys") else full)
        else:
            full = tok(row.prompt, add_special_tokens=True).input_ids
        for m in (1, 9, 64, 300, 1000):
            (ex,) = encode_rows([row], tok, max_prompt_tokens=m, use_chat_template=chat).examples
            assert list(ex.prompt_ids) == full[-m:], (end, m)
        _, was_cut = cut_to_budget(row.prompt, tok, 64)
        assert was_cut  # the bound did apply


def test_last_word_longer_than_the_window_is_kept_whole():
    tok = _bpe_tokenizer()
    text = "the fox " * 2000 + "a" * 9_999  # one 10k-letter word at the end
    tail, cut = cut_to_budget(text, tok, 16)
    assert cut and tail == " " + "a" * 9_999
    (ex,) = encode_rows([Row(text, None, None, None, "x")], tok, max_prompt_tokens=16,
                        use_chat_template=False).examples  # fmt: skip
    assert list(ex.prompt_ids) == tok(text).input_ids[-16:]


def test_multi_megabyte_line_is_fast_and_exact(tmp_path):
    tok = char_tokenizer()
    prompt = "".join(f"word{i % 97} " for i in range(1_000_000))  # about 7 MB, one JSONL line
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": prompt}) + "\n")
    t0 = time.perf_counter()
    rows = load_rows(path).rows
    result = encode_rows(rows, tok, max_prompt_tokens=256)
    seconds = time.perf_counter() - t0
    assert seconds < 8, seconds  # tokenising the whole line takes ~25 s with this tokenizer
    assert result.truncated == 1
    # The char tokenizer maps each character to one token whatever surrounds it, so full
    # tokenisation + left truncation keeps exactly the tokens of the render of a shorter tail.
    reference = encode_rows([Row(prompt[-5000:], None, None, None, "r")], tok,
                            max_prompt_tokens=256).examples[0]  # fmt: skip
    assert result.examples[1].prompt_ids == reference.prompt_ids
    assert len(reference.prompt_ids) == 256


def test_huge_prompt_with_truncation_error_names_the_row():
    tok = char_tokenizer()
    row = Row("word " * 200_000, None, None, None, "big.jsonl:3")
    with pytest.raises(DataError, match=r"^big\.jsonl:3: prompt is at least \d+ tokens, over"):
        encode_rows([row], tok, max_prompt_tokens=32, truncation="error")


# ---------------------------------------------------------------------------- bad text


def test_lone_surrogate_and_deep_nesting_are_row_errors_that_can_be_skipped(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(
        '{"prompt": "ok"}\n'
        '{"prompt": "x\\ud800"}\n'
        '{"messages": [{"role": "user", "content": "\\udc00"}]}\n'
        '{"prompt": "y", "completion": "\\ud83d"}\n'
        '{"prompt": "a", "answer": "\\ud800"}\n'
        '{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}\n"
        '{"prompt": "fine \\ud83d\\ude00"}\n'  # a full surrogate pair is text (an emoji)
    )
    with pytest.raises(DataError, match=r"^odd\.jsonl:2: field 'prompt' holds a lone surrogate"):
        load_rows(path)
    result = load_rows(path, skip_bad_rows=True)
    assert [r.prompt for r in result.rows] == ["ok", "fine \U0001f600"]
    assert result.skipped == 5
    fields = ["'prompt'", "'messages[0]'", "'completion'", "'answer'", "'prompt' is JSON nested"]
    for msg, lineno, field in zip(result.skipped_examples, range(2, 7), fields):
        assert msg.startswith(f"odd.jsonl:{lineno}: field {field}"), msg


def test_skip_bad_rows_on_the_cli_counts_a_surrogate_row(tmp_path):
    model_dirs = save_tiny_models(tmp_path / "models")
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "1+1="}\n{"prompt": "\\ud800"}\n{"prompt": "2+2="}\n' * 4)
    args = small_cli_args(tmp_path, model_dirs, path, "train.steps=1", "data.eval=")
    bad = run_opd(["distill", *args])
    assert_clean_error(bad, "s.jsonl:2", "surrogate")
    good = run_opd(
        ["distill", "--skip-bad-rows", "--no-report", *args, f"output_dir={tmp_path}/r2"]
    )
    assert good.traceback is None and good.code == 0, good.err
    assert "4 bad rows skipped" in good.out and "s.jsonl:2: field 'prompt'" in good.out


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads anything")
def test_permission_denied_is_a_data_error(tmp_path):
    path = tmp_path / "locked.jsonl"
    path.write_text('{"prompt": "a"}\n')
    path.chmod(0)
    with pytest.raises(DataError, match=r"locked\.jsonl: cannot read the prompt file"):
        load_rows(path)


def test_directory_and_unreadable_file(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(DataError, match=r"d\.jsonl: is a directory, not a prompt file"):
        load_rows(tmp_path / "d.jsonl")
    if os.path.exists("/proc/self/mem"):
        (tmp_path / "mem.jsonl").symlink_to("/proc/self/mem")
        with pytest.raises(DataError, match=r"mem\.jsonl: cannot read the prompt file"):
            load_rows(tmp_path / "mem.jsonl")
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    with pytest.raises(DataError, match=r"pipe\.jsonl: not a regular file"):
        load_rows(fifo)
