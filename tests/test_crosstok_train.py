"""Cross-tokenizer on-policy distillation end to end: equality with sampled_rkl for identical
tokenizers, a run between two tokenizer families, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from opd.build import Models
from opd.context import StepContext
from opd.crosstok import CrossTokenizerLogprobs, SpanSampledRKL
from opd.crosstok.access import render_prompt
from opd.crosstok.evaluate import teacher_nll_per_byte
from opd.crosstok.models import cross_tokenizer_models
from opd.data.sets import build_data
from opd.errors import ModelError
from opd.method import Method
from opd.models import decoder_and_head
from opd.recipes import get_recipe
from opd.sampling import student as student_source
from opd.sampling.sources import make_rollout
from opd.step import micro_step, student_rows
from opd.teachers import SampledLogprobs
from opd.tiny import tiny_llama
from opd.train import distill
from tests.helpers import assert_clean_error, fresh_models, run_opd, tiny_cfg, write_prompts
from tests.test_crosstok_tokenizers import byte_level_tok, sentencepiece_tok

SENTENCES = [
    "the cat sat on the mat.",
    "the dog sat on the log.",
    "a cat and a dog.",
    "the mat is on the log.",
    "sat on a mat.",
    "the cat is a dog.",
]


def quiet(*_args, **_kw):
    pass


def test_identical_tokenizers_equal_sampled_rkl_exactly(tok, prompt_file, tmp_path):
    """Every span is one token: losses of 3 steps and the trained weights are identical."""
    out = {}
    for name in ("sampled_rkl", "xtok_sampled_rkl"):
        cfg = tiny_cfg(tmp_path, prompt_file, f"method.recipe={name}", "train.steps=3", name=name)
        res = distill(cfg, models=fresh_models(tok), evaluate=False, log=quiet)
        params = [p.detach().clone() for p in res.models.student.parameters()]
        out[name] = (res.losses, params, [(m["tokens"], m["teacher_kl"]) for m in res.metrics])
    (loss_a, params_a, tokens_a), (loss_b, params_b, tokens_b) = out.values()
    assert len(loss_a) == 3 and loss_a == loss_b and tokens_a == tokens_b
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def test_identical_tokenizers_same_gradients(tok):
    """One micro-batch: the loss and every gradient equal sampled_rkl's bit for bit."""
    prompts = [tok("3+4=", add_special_tokens=False).input_ids, tok("12+1=").input_ids]
    comps = [tok("7x9", add_special_tokens=False).input_ids + [tok.eos_token_id], [5, 6]]
    ro = make_rollout(prompts, comps, 0, "student")
    grads, losses = [], []
    for name in ("sampled_rkl", "xtok_sampled_rkl"):
        models = fresh_models(tok)
        method = get_recipe(name).build()
        if hasattr(method.teacher, "prepare"):
            method.teacher.prepare(models)
        ctx = StepContext(chunk_size=3, models=models)
        loss, _, _ = micro_step(method, models, ro, ctx, torch.device("cpu"))
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in models.student.parameters()])
        if name == "xtok_sampled_rkl":
            assert ctx.metrics["xtok_unaligned"] == 0
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert any(bool(g.abs().sum() > 0) for g in grads[0])


def trained_teacher(t_tok, prompts, steps=40, seed=3):
    """A tiny teacher taught, after its own chat prompt, to write short sentences."""
    teacher = tiny_llama(len(t_tok), hidden=64, layers=2, seed=seed)
    seqs = [render_prompt(({"role": "user", "content": p},), t_tok, "") for p in prompts]
    comps = [
        t_tok(SENTENCES[i % len(SENTENCES)], add_special_tokens=False).input_ids
        + [t_tok.eos_token_id]
        for i in range(len(seqs))
    ]
    ro = make_rollout(seqs, comps, 0, "teacher")
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    P = ro.prompt_len
    target_BT = ro.completion_ids_BT.masked_fill(ro.completion_mask_BT == 0, -100)
    for _ in range(steps):
        logits = teacher(input_ids=ro.input_ids_BL, attention_mask=ro.attention_mask_BL).logits
        logits = logits[:, P - 1 : -1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_BT.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.requires_grad_(False).eval()


@pytest.mark.parametrize(
    "pair",
    [
        "sentencepiece->byte_level",
        pytest.param("byte_level->sentencepiece", marks=pytest.mark.slow),
    ],
)
def test_cross_tokenizer_run_lowers_teacher_nll_per_byte(tmp_path, pair):
    """Student and teacher of different tokenizer families (and chat templates): 30 steps of
    xtok_sampled_rkl lower the teacher's NLL per byte of the student's greedy outputs."""
    bl, sp = byte_level_tok(300), sentencepiece_tok(420)
    s_tok, t_tok = (sp, bl) if pair.startswith("sentencepiece") else (bl, sp)
    cfg, method, models = xtok_setup(tmp_path, "xtok_sampled_rkl", s_tok, t_tok)
    assert models.tokenizer is s_tok and models.teacher_tokenizer is t_tok
    assert models.vocab_size == len(s_tok)
    data = build_data(cfg, s_tok)
    assert data.eval[0].raw_prompt  # carried for the teacher's own chat template
    before = teacher_nll_per_byte(models, data.eval, max_new_tokens=12)
    res = distill(cfg, models=models, data=data, method=method, log=quiet)
    after = teacher_nll_per_byte(models, data.eval, max_new_tokens=12)
    assert after["bytes"] > 0.3 * before["bytes"]  # it did not learn to stop writing
    # byte_level -> sentencepiece: since each row samples from its own seeded generator
    # (opd.sampling.rows) the size of the drop depends on train.seed: after / before was
    # 0.93, 0.83, 0.26, 0.57 for seeds 0-3 (lr 3e-3); the other direction keeps the 20 % bound
    bound = 0.8 if pair.startswith("sentencepiece") else 0.95
    assert after["nll_per_byte"] < bound * before["nll_per_byte"], (before, after)
    assert len([r for r in res.metrics if "xtok_kl" in r]) == 30
    rows = [json.loads(x) for x in open(res.run_dir / "metrics.jsonl")]
    nll = [r["heldout_teacher_nll_per_byte"] for r in rows if r.get("event") == "eval"]
    assert len(nll) == 2 and nll[1] < nll[0]  # the run's own held-out rows agree
    assert nll[1] == pytest.approx(after["nll_per_byte"])


def xtok_setup(tmp_path, recipe, s_tok, t_tok):
    """(cfg, method, models) for 30 steps of `recipe`: a random student of `s_tok`, a teacher
    of `t_tok` trained on the prompts (shared with test_crosstok_gold_runs.py)."""
    pf = write_prompts(tmp_path / "p.jsonl", n=16)
    teacher = trained_teacher(t_tok, [json.loads(line)["prompt"] for line in open(pf)])
    student = tiny_llama(len(s_tok), hidden=48, layers=2, seed=4)
    cfg = tiny_cfg(
        tmp_path,
        pf,
        f"method.recipe={recipe}",
        "train.steps=30",
        "data.chat_template=auto",
        "sampling.max_new_tokens=12",
        "train.batch_size=8",
        "model.student=student",
        "model.teacher=teacher",
    )
    method = get_recipe(recipe).build()
    return cfg, method, cross_tokenizer_models(cfg, method, teacher, student, s_tok, t_tok)


def _save(folder, model, tok):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_cli_cross_tokenizer_pair(tmp_path):
    """`opd distill recipe=xtok_sampled_rkl` on two saved models of different tokenizers
    runs; any other recipe on that pair is refused in one line naming the xtok recipes."""
    bl, sp = byte_level_tok(300), sentencepiece_tok(420)
    teacher = _save(tmp_path / "teacher", tiny_llama(len(sp), hidden=64, layers=2, seed=1), sp)
    student = _save(tmp_path / "student", tiny_llama(len(bl), hidden=48, layers=2, seed=2), bl)
    data = write_prompts(tmp_path / "p.jsonl", n=8)
    common = [
        f"model.teacher={teacher}",
        f"model.student={student}",
        f"data.train={data}",
        f"data.eval={data}",
        "data.eval_count=4",
        "train.steps=2",
        "train.batch_size=2",
        "sampling.max_new_tokens=6",
        "train.progress=false",
    ]
    bad = run_opd(["distill", *common, "recipe=sampled_rkl", f"output_dir={tmp_path / 'bad'}"])
    line = assert_clean_error(bad, "different tokenizers", "recipe=xtok_sampled_rkl", "sampled_rkl")
    assert str(student) in line and str(teacher) in line
    assert not (tmp_path / "bad").exists()

    res = run_opd(["distill", *common, "recipe=xtok_sampled_rkl", f"output_dir={tmp_path / 'ok'}"])
    assert res.code == 0 and res.traceback is None, res.err + (res.traceback or "")
    rows = [json.loads(x) for x in open(tmp_path / "ok" / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all("xtok_unaligned" in r and "xtok_kl" in r for r in steps)
    evals = [r for r in rows if r.get("event") == "eval"]
    assert [r["heldout_kl"] for r in evals] == [None, None]
    assert all(r["heldout_teacher_nll_per_byte"] > 0 for r in evals)
    assert (tmp_path / "ok" / "student" / "tokenizer.json").is_file()
    saved = json.loads((tmp_path / "ok" / "student" / "tokenizer.json").read_text())
    assert len(saved["model"]["vocab"]) == 300  # the student keeps its own tokenizer
    ev = run_opd(["eval", tmp_path / "ok"])
    assert ev.code == 0 and ev.traceback is None, ev.err + (ev.traceback or "")
    assert "teacher NLL per byte of the student's greedy outputs:" in ev.out


def test_models_of_two_tokenizers_need_a_cross_tokenizer_method(tmp_path, prompt_file):
    bl, sp = byte_level_tok(300), sentencepiece_tok(420)
    teacher, student = tiny_llama(len(sp), seed=1), tiny_llama(len(bl), seed=2)
    models = Models(teacher, student, bl, teacher_tokenizer=sp)
    cfg = tiny_cfg(tmp_path, prompt_file, "method.recipe=sampled_rkl")
    with pytest.raises(ModelError, match="recipe=xtok_sampled_rkl") as err:
        distill(cfg, models=models, log=quiet)
    assert "different tokenizers" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_span_scores_sum_the_teachers_tokens_and_masked_spans_are_counted():
    """span_teacher_logprobs_G is Σ log p_teacher over each span's teacher tokens (checked
    against scoring the teacher's rollout directly); with mask_invalid a cut character is
    masked: span −1, loss 0 there, and counted in xtok_unaligned."""
    bl, sp = byte_level_tok(300), sentencepiece_tok(420)
    teacher, student = tiny_llama(len(sp), seed=1), tiny_llama(len(bl), seed=2)
    models = Models(teacher, student, bl, len(bl), teacher_tokenizer=sp)
    cut = [bl.convert_tokens_to_ids(bytes_to_unicode()[b]) for b in "你".encode()[:2]]
    text_ids = bl("the cat sat", add_special_tokens=False).input_ids
    comps = [text_ids + cut, text_ids + [bl.convert_tokens_to_ids("<|im_end|>")]]
    prompts = [bl("3+4=", add_special_tokens=False).input_ids] * 2
    ro = make_rollout(prompts, comps, 0, "student", raw_prompts=["3+4=", "3+4="])
    access = CrossTokenizerLogprobs(mask_invalid=True)
    access.prepare(models)
    scores = access.score(teacher, ro, len(bl))
    t_ro, spans = access.teacher_rollout(ro)
    assert t_ro.completion_ids_BT[1][t_ro.completion_mask_BT[1].bool()][-1] == sp.eos_token_id
    row0 = sp.decode(t_ro.input_ids_BL[0][t_ro.attention_mask_BL[0].bool()])
    assert row0.strip() == "3+4= the cat sat\ufffd"  # raw prompt + the teacher's completion
    logp_M = SampledLogprobs().score(teacher, t_ro, len(sp)).token_logprobs_N
    m0 = int(t_ro.completion_mask_BT[0].sum())
    expected = [
        float(logp_M[off + s.t_start : off + s.t_end].sum())
        for off, row in ((0, spans[0]), (m0, spans[1]))
        for s in row
        if s.aligned
    ]
    assert scores.span_teacher_logprobs_G.tolist() == pytest.approx(expected, abs=1e-5)
    index = scores.span_index_N.tolist()
    n0 = len(comps[0])
    assert index[n0 - 2 : n0] == [-1, -1] and min(index[: n0 - 2] + index[n0:]) >= 0
    method = Method(prefixes=student_source(), teacher=access, signal=SpanSampledRKL())
    ctx = StepContext(chunk_size=4, models=models)
    loss, _, _ = micro_step(method, models, ro, ctx, torch.device("cpu"))
    assert ctx.metrics["xtok_unaligned"] == 2 and bool(torch.isfinite(loss))
    srows = student_rows(*decoder_and_head(student, verify=False)[:2], ro, torch.device("cpu"))
    values_N = SpanSampledRKL()(srows, scores, ctx)
    assert values_N[n0 - 2 : n0].tolist() == [0.0, 0.0] and bool(values_N[: n0 - 2].ne(0).all())
