"""Held-out measurements: KL direction, zero at identity, accuracy from the same pass."""

from __future__ import annotations

import pytest

from opd.data import Example
from opd.evaluate import EvalTable, generic_verify, heldout_kl, task_accuracy


def exs(tok):
    return [
        Example(tuple(tok(f"{i}+1=", add_special_tokens=False).input_ids), None, str(i + 1), f"m:{i}", f"{i}+1=")
        for i in range(5)
    ]


def test_heldout_kl_is_zero_for_the_teacher_itself(tiny_models):
    t, s, tok = tiny_models
    kw = dict(pad_id=0, stop_ids=(2,), vocab_size=len(tok), max_new_tokens=5)
    same = heldout_kl(t, t, exs(tok), **kw)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["tokens"] > 0
    assert heldout_kl(s, t, exs(tok), **kw)["kl"] > 0.01


def test_accuracy_from_the_kl_pass_equals_task_accuracy(tiny_models):
    t, s, tok = tiny_models
    always = lambda text, answer: text.startswith(tok.decode([tok.convert_tokens_to_ids("a")]))  # noqa: E731
    res = heldout_kl(s, t, exs(tok), pad_id=0, stop_ids=(2,), vocab_size=len(tok), max_new_tokens=5,
                     tokenizer=tok, verify=always)
    ref = task_accuracy(s, tok, exs(tok), pad_id=0, stop_ids=(2,), max_new_tokens=5, verify=always)
    assert res["accuracy"] == ref["accuracy"] and ref["n"] == 5


def test_generic_verify():
    assert generic_verify("so 3 + 4 = 7. The answer is 7.", "7")
    assert not generic_verify("the answer is 8", "7")
    assert generic_verify("result: Paris", "paris")
    assert not generic_verify("", "7")


def test_eval_table_render():
    text = EvalTable([("teacher", None, 0.5), ("student", 1.25, None)]).render()
    assert "50.0%" in text and "1.2500" in text and "—" in text
