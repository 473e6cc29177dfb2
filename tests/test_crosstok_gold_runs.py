"""xtok_gold end to end: the SpanLogits access, GoldSignal and the recipe (the teacher's
tokenisation and span alignment come from opd.crosstok.access / opd.crosstok.align)."""

from __future__ import annotations

import pytest
import torch

from opd.crosstok.uld import complement_ids
from opd.crosstok.vocab_map import vocab_bytes
from opd.tiny import char_tokenizer
from tests.test_crosstok_gold import bpe_tokenizer

# ---------------------------------------------------------------------------------------------
# The access mode, the signal and the recipe (the span alignment comes from opd.crosstok.align)


def _rollout_and_models(t_tok=None, sampled=True, n=3, dtype=torch.float64):
    """Tiny models (student on opd.tiny's character tokenizer, teacher on `t_tok`) and a
    rollout: sampled from the student, or fixed English completions (ending with <|im_end|>
    on the first row) that a trained teacher tokenizer merges into multi-character tokens."""
    from opd.build import Models
    from opd.context import StepContext
    from opd.data import Example
    from opd.sampling import GenerationParams, HFBackend, student
    from opd.tiny import IM_END, tiny_llama
    from opd.types import Rollout

    s_tok = char_tokenizer()
    t_tok = t_tok or s_tok
    teacher = tiny_llama(len(t_tok), hidden=64, layers=3, seed=11).to(dtype)
    s_model = tiny_llama(len(s_tok), hidden=48, layers=2, seed=12).to(dtype)
    models = Models(teacher=teacher, student=s_model, tokenizer=s_tok, vocab_size=len(s_tok))
    models.teacher_tokenizer = t_tok
    prompts = [s_tok.encode(p) for p in ["the cat", "12+30=", "then "][:n]]
    if sampled:
        exs = [Example(tuple(p), (), "", f"m:{i}", "") for i, p in enumerate(prompts)]
        ctx = StepContext(
            s_model, teacher, HFBackend(), GenerationParams(8, 1.0), models.pad_id, models.stop_ids
        )
        torch.manual_seed(0)
        return models, student().rollout(exs, ctx)
    comps = [s_tok.encode(" sat on the mat") + [s_tok.convert_tokens_to_ids(IM_END)]]
    comps += [s_tok.encode(c) for c in ["42 and the cat", "the other"]][: n - 1]
    P, T = max(map(len, prompts)), max(map(len, comps))
    ids = torch.full((n, P + T), models.pad_id, dtype=torch.long)
    attn, mask = torch.zeros_like(ids), torch.zeros(n, T, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, comps)):
        ids[b, P - len(p) : P], ids[b, P : P + len(c)] = torch.tensor(p), torch.tensor(c)
        attn[b, P - len(p) : P + len(c)] = 1
        mask[b, : len(c)] = 1
    return models, Rollout(ids, attn, P, mask, writer="student")


def _micro_step(method, models, rollout, materialize):
    from opd.context import StepContext
    from opd.train import micro_step

    models.student.zero_grad()
    ctx = StepContext(chunk_size=5, materialize=materialize, models=models)
    loss, _, _ = micro_step(method, models, rollout, ctx, "cpu")
    loss.backward()
    grads = [p.grad.clone() for p in models.student.parameters()]
    return loss.detach(), grads, ctx.metrics


def test_identical_tokenizers_give_on_policy_rkl_exactly():
    from opd.recipes import get_recipe

    models, rollout = _rollout_and_models()
    gold = get_recipe("xtok_gold").build(uld_weight=2.0)
    gold.teacher.prepare(models)
    ref = get_recipe("on_policy_rkl").build()
    for materialize in (False, True):
        loss, grads, metrics = _micro_step(gold, models, rollout, materialize)
        loss_ref, grads_ref, _ = _micro_step(ref, models, rollout, materialize)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
        assert metrics["gold_pairs"] == rollout.num_tokens
        assert metrics["gold_masked_tokens"] == metrics["gold_masked_spans"] == 0


def _span_bytes(table, ids, start, end):
    return b"".join(table[i] or b"" for i in ids[start:end])


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_different_tokenizers_pair_positions_that_follow_the_same_bytes(kind):
    pytest.importorskip("opd.crosstok.align")
    from opd.crosstok.gold import SpanLogits

    t_tok = bpe_tokenizer(kind, 330 if kind == "byte_level" else 120)
    models, rollout = _rollout_and_models(t_tok, sampled=False)
    access = SpanLogits()
    access.prepare(models)
    s_table = vocab_bytes(models.tokenizer, len(models.tokenizer))
    t_table = vocab_bytes(t_tok, len(t_tok))
    multi = 0
    t_rollout, spans_per_row = access.teacher_rollout(rollout)
    for b, spans in enumerate(spans_per_row):
        comp = rollout.completion_ids_BT[b][rollout.completion_mask_BT[b].bool()].tolist()
        t_comp = t_rollout.completion_ids_BT[b][t_rollout.completion_mask_BT[b].bool()].tolist()
        n_s = len(comp)
        assert [sp.s_start for sp in spans] == [0] + [sp.s_end for sp in spans[:-1]]
        assert spans[-1].s_end == n_s and spans[-1].t_end == len(t_comp)
        for sp in spans:
            if sp.aligned and sp.t_end > sp.t_start:  # same bytes, hence the same context
                same = _span_bytes(s_table, comp, sp.s_start, sp.s_end)
                assert same == _span_bytes(t_table, t_comp, sp.t_start, sp.t_end)
                assert _span_bytes(s_table, comp, 0, sp.s_start) == _span_bytes(
                    t_table, t_comp, 0, sp.t_start
                )
            multi += sp.s_end - sp.s_start > 1
    assert multi > 0  # the teacher's merges make spans of several student characters
    scores = access.score(models.teacher, rollout, len(s_table))
    P = scores.pair_student_P.numel()
    assert P + scores.masked_tokens == rollout.num_tokens and scores.masked_spans == 0
    assert scores.pair_hidden_PE.shape == (P, 64)
    one = SpanLogits(span_rule="one_to_one")
    one.prepare(models)
    strict = one.score(models.teacher, rollout, len(s_table))
    assert strict.pair_student_P.numel() < P and strict.masked_spans > 0
    assert set(strict.pair_student_P.tolist()) <= set(scores.pair_student_P.tolist())


def test_different_tokenizers_chunked_equals_materialized_and_training_lowers_matched_part():
    pytest.importorskip("opd.crosstok.align")
    from opd.context import StepContext
    from opd.models import decoder_and_head
    from opd.recipes import get_recipe
    from opd.step import student_rows

    t_tok = bpe_tokenizer("byte_level", 330)
    models, rollout = _rollout_and_models(t_tok, sampled=False)
    method = get_recipe("xtok_gold").build(temperature=1.5)
    method.teacher.prepare(models)
    loss_c, grads_c, metrics = _micro_step(method, models, rollout, False)
    loss_m, grads_m, _ = _micro_step(method, models, rollout, True)
    torch.testing.assert_close(loss_c, loss_m, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_c, grads_m):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    assert metrics["gold_masked_tokens"] > 0 and loss_c > 0
    # Every student id (ASCII characters, specials) has a teacher twin, so the student's
    # unmatched remainder is empty and the ULD part is the teacher's mass on tokens the
    # student cannot write (its merges): a constant. The matched divergence is what trains.
    scores = method.teacher.score(models.teacher, rollout, len(models.tokenizer))
    assert scores.match_s_M.numel() == len(models.tokenizer)
    signal = method.signal
    matched = get_recipe("xtok_gold").build(temperature=1.5, uld_weight=0.0).signal
    uld = get_recipe("xtok_gold").build(temperature=1.5, matched_weight=0.0).signal
    logits_t = scores.pair_hidden_PE @ scores.pair_head_UE.T
    rest_t = complement_ids(scores.match_t_M, logits_t.shape[1])
    opt = torch.optim.Adam(models.student.parameters(), lr=1e-2)
    dec, head, _ = decoder_and_head(models.student, verify=False)
    ctx, idx, parts = StepContext(chunk_size=5), scores.pair_student_P, []
    for _ in range(12):
        rows = student_rows(dec, head, rollout, "cpu")
        with torch.no_grad():
            u = uld(rows, scores, ctx)[idx]
            torch.testing.assert_close(u, torch.softmax(logits_t / 1.5, -1)[:, rest_t].sum(-1))
            parts.append(float(matched(rows, scores, ctx).sum()))
        opt.zero_grad()
        signal(rows, scores, ctx).sum().backward()
        opt.step()
    assert parts[-1] < 0.5 * parts[0], parts


def test_recipe_arguments_and_part_checks():
    from opd.errors import ConfigError
    from opd.method import Method
    from opd.recipes import get_recipe
    from opd.sampling import student
    from opd.signals import Divergence
    from opd.teachers import FullLogits

    m = get_recipe("xtok_gold").build(divergence="generalized_jsd", beta=0.25)
    assert m.signal.params == {"beta": 0.25}
    assert "generalized_jsd(beta=0.25)" in m.signal.describe()
    assert get_recipe("xtok_gold").build().signal.params == {}  # reverse_kl takes no beta
    with pytest.raises(ConfigError, match="span_rule must be one of first, one_to_one"):
        get_recipe("xtok_gold").build(span_rule="all")
    with pytest.raises(ConfigError, match="unknown divergence 'nope'"):
        get_recipe("xtok_gold").build(divergence="nope")
    with pytest.raises(ConfigError, match="uld_weight must be >= 0"):
        get_recipe("xtok_gold").build(uld_weight=-1.0)
    with pytest.raises(ConfigError, match="span_full_logits"):
        Method(prefixes=student(), teacher=FullLogits(), signal=m.signal)
    with pytest.raises(ConfigError, match="full_logits"):
        Method(prefixes=student(), teacher=m.teacher, signal=Divergence())


def test_xtok_gold_runs_through_distill_and_logs_its_counts(tmp_path, prompt_file, tok):
    from opd.train import distill
    from tests.helpers import fresh_models, tiny_cfg

    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=2", "method.recipe=xtok_gold")
    res = distill(cfg, models=fresh_models(tok), evaluate=False, log=lambda *_: None)
    assert len(res.losses) == 2 and all(x > 0 for x in res.losses)
    row = res.metrics[-1]
    assert row["gold_pairs"] == row["tokens"] / cfg.train.grad_accum
    assert row["gold_masked_tokens"] == 0 and row["grad_norm"] > 0
    assert row["loss"] == pytest.approx(row["gold_value"], rel=1e-5)


def test_cross_tokenizer_run_lowers_teacher_nll_per_byte(tmp_path):
    """SentencePiece-style student, byte-level teacher taught a few sentences after its own
    chat prompt: 30 steps of xtok_gold lower the teacher's NLL per byte of the student's
    greedy outputs (the xtok branch's check for xtok_sampled_rkl, here for the GOLD loss)."""
    from opd.crosstok.evaluate import teacher_nll_per_byte
    from opd.data.sets import build_data
    from opd.train import distill
    from tests.test_crosstok_tokenizers import byte_level_tok, sentencepiece_tok
    from tests.test_crosstok_train import xtok_setup

    s_tok, t_tok = sentencepiece_tok(420), byte_level_tok(300)
    cfg, method, models = xtok_setup(tmp_path, "xtok_gold", s_tok, t_tok)
    data = build_data(cfg, s_tok)
    before = teacher_nll_per_byte(models, data.eval, max_new_tokens=12)
    res = distill(cfg, models=models, data=data, method=method, evaluate=False, log=lambda *_: None)
    after = teacher_nll_per_byte(models, data.eval, max_new_tokens=12)
    assert after["bytes"] > 0.3 * before["bytes"]
    assert after["nll_per_byte"] < 0.8 * before["nll_per_byte"], (before, after)
    first, last = res.metrics[0], res.metrics[-1]
    assert first["gold_pairs"] > 0 and last["gold_value"] < first["gold_value"]
    assert res.metrics[0]["gold_pairs"] + res.metrics[0]["gold_masked_tokens"] == first["tokens"]


def test_cli_runs_xtok_gold_between_two_tokenizer_families(tmp_path):
    import json

    pytest.importorskip("opd.crosstok.models")
    tokenizers = pytest.importorskip("tests.test_crosstok_tokenizers")
    from opd.tiny import tiny_llama
    from tests.helpers import run_opd, write_prompts

    bl, sp = tokenizers.byte_level_tok(300), tokenizers.sentencepiece_tok(420)
    dirs = {}
    for name, tok_, hidden, seed in (("teacher", sp, 64, 1), ("student", bl, 48, 2)):
        tiny_llama(len(tok_), hidden=hidden, layers=2, seed=seed).save_pretrained(tmp_path / name)
        tok_.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    data = write_prompts(tmp_path / "p.jsonl", n=8)
    res = run_opd(
        [
            "distill",
            f"model.teacher={dirs['teacher']}",
            f"model.student={dirs['student']}",
            f"data.train={data}",
            f"data.eval={data}",
            "data.eval_count=4",
            "train.steps=2",
            "train.batch_size=2",
            "sampling.max_new_tokens=6",
            "train.progress=false",
            "recipe=xtok_gold",
            "method.args.span_rule=one_to_one",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    assert res.code == 0 and res.traceback is None, res.err + (res.traceback or "")
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(r["gold_pairs"] > 0 for r in steps)
    assert all(r["gold_pairs"] + r["gold_masked_tokens"] == r["tokens"] for r in steps)


def test_a_teacher_ensemble_is_refused_in_one_line():
    from opd.errors import ConfigError
    from opd.recipes import get_recipe
    from opd.teachers.ensemble import TeacherEnsemble

    models, rollout = _rollout_and_models()
    access = get_recipe("xtok_gold").build().teacher
    access.prepare(models)
    pair = TeacherEnsemble([models.teacher, models.teacher])
    with pytest.raises(ConfigError, match="one teacher, got an ensemble of 2"):
        access.score(pair, rollout, len(models.tokenizer))
