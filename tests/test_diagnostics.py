"""Run diagnostics: exposure gap, top-k overlap, per-position KL, entropy, ECE, stop rate."""

from __future__ import annotations

import math

import pytest
import torch

from opd.data import Example
from opd.diagnostics import completion_stats, eval_diagnostics, expected_calibration_error
from opd.evaluate import greedy_completions, heldout_kl
from opd.logs import read_metrics
from opd.train import distill
from tests.helpers import fresh_models, tiny_cfg


def exs(tok, n=5):
    return [
        Example(tuple(tok(f"{i}+1=", add_special_tokens=False).input_ids), None, str(i + 1),
                f"m:{i}", f"{i}+1=")
        for i in range(n)
    ]  # fmt: skip


KW = dict(pad_id=0, stop_ids=(2,), max_new_tokens=6)


def diag(student, teacher, tok, **extra):
    e = exs(tok)
    comps = greedy_completions(student, e, 0, (2,), 6)
    return eval_diagnostics(student, teacher, e, comps, tokenizer=tok, vocab_size=len(tok),
                            **KW, **extra)  # fmt: skip


def test_teacher_against_itself_has_no_gap_full_overlap(tiny_models):
    t, _, tok = tiny_models
    d = diag(t, t, tok)
    for key in ("diag_rkl_own", "diag_fkl_own", "diag_rkl_teacher", "diag_exposure_gap_rkl"):
        assert d[key] == pytest.approx(0.0, abs=1e-5), key
    assert d["diag_topk_overlap"] == pytest.approx(1.0)
    # the teacher's own argmax IS the written token on its own greedy text: accuracy 1 per bin
    cal = d["diag_calibration"]
    assert sum(cal["count"]) == 5 * d["diag_length"]
    assert all(a is None or a == 1.0 for a in cal["accuracy"])
    assert d["diag_entropy"] > 0 and "diag_note" not in d


def test_student_numbers_match_heldout_kl_and_the_gap_is_own_minus_teacher(tiny_models):
    t, s, tok = tiny_models
    d = diag(s, t, tok)
    ref = heldout_kl(s, t, exs(tok), vocab_size=len(tok), **KW)
    assert d["diag_rkl_own"] == pytest.approx(ref["kl"], rel=1e-4)
    assert d["diag_rkl_teacher"] > 0 and d["diag_fkl_own"] > 0
    assert d["diag_exposure_gap_rkl"] == pytest.approx(d["diag_rkl_own"] - d["diag_rkl_teacher"])
    assert d["diag_exposure_gap_fkl"] == pytest.approx(d["diag_fkl_own"] - d["diag_fkl_teacher"])
    assert 0.0 <= d["diag_topk_overlap"] < 1.0
    assert 0.0 <= d["diag_ece"] <= 1.0
    # per-position curve: buckets of ceil(6/8)=1 position; their token-weighted mean is the KL
    pos = d["diag_kl_by_position"]
    assert pos["start"] == list(range(6))
    assert d["diag_length"] == ref["mean_length"]
    samples = d["diag_samples"]
    assert (
        len(samples) == 3 and samples[0]["prompt"] == "0+1=" and samples[0]["teacher"] is not None
    )


def test_a_frozen_teachers_text_and_scores_are_computed_once(tiny_models):
    t, s, tok = tiny_models
    t.requires_grad_(False)
    calls = []
    hook = t.model.register_forward_hook(lambda *a: calls.append(1))
    first = diag(s, t, tok)
    n_first = len(calls)
    second = diag(s, t, tok)  # own prefixes: one teacher forward; teacher prefixes: cached
    hook.remove()
    assert len(calls) - n_first == 1 < n_first
    assert second["diag_rkl_teacher"] == pytest.approx(first["diag_rkl_teacher"])


def test_ece_known_values():
    ece, table = expected_calibration_error(torch.tensor([0.95, 0.95, 0.15, 1.0]),
                                            torch.tensor([1.0, 0.0, 0.0, 1.0]))  # fmt: skip
    # bin 9: conf (0.95 + 0.95 + 1.0) / 3, acc 2/3; bin 1: conf 0.15, acc 0
    expected = (3 * abs(2 / 3 - 2.9 / 3) + 0.15) / 4
    assert ece == pytest.approx(expected)
    assert table["count"][9] == 3 and table["count"][1] == 1 and table["accuracy"][0] is None


def test_completion_stats_stop_rate():
    st = completion_stats([[5, 2], [5, 5, 5], [5]], stop_ids=(2,), max_new_tokens=3)
    assert st["diag_length"] == 2.0
    assert st["diag_stop_rate"] == pytest.approx(2 / 3)  # stop token, full length, short


class TextOnly:
    """A black-box teacher: writes text elsewhere, gives no log-probs."""

    provides = frozenset({"text"})

    def describe(self):
        return "text only"


def test_teacher_without_logits_nulls_teacher_keys_and_never_crashes(tiny_models):
    _, s, tok = tiny_models
    d = diag(s, TextOnly(), tok)
    for key in ("diag_rkl_own", "diag_exposure_gap_rkl", "diag_topk_overlap", "diag_ece"):
        assert d[key] is None
    assert d["diag_entropy"] > 0 and d["diag_length"] > 0
    assert "no full logits" in d["diag_note"] and d["diag_samples"][0]["teacher"] is None


def test_every_eval_row_of_a_run_carries_the_diagnostics(tmp_path, tok, prompt_file):
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=2", "train.eval_every=1")
    res = distill(cfg, models=fresh_models(tok), log=lambda *a: None)
    evals = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for r in evals:
        assert r["diag_rkl_own"] == pytest.approx(r["heldout_kl"], rel=1e-4)
        assert math.isfinite(r["diag_exposure_gap_fkl"]) and r["diag_seconds"] > 0
        assert len(r["diag_calibration"]["count"]) == 10
