"""GOLD-style cross-tokenizer loss (opd.crosstok.uld), vocabulary matches, signal and recipe."""

from __future__ import annotations

import pytest
import torch

from opd.crosstok.uld import chunked_gold_loss, complement_ids, gold_loss, sorted_l1
from opd.crosstok.vocab_map import (
    exact_matches,
    piece_bytes,
    tokenizer_kind,
    vocab_bytes,
    vocab_keys,
    vocab_matches,
)
from opd.losses import divergence
from opd.tiny import char_tokenizer


def _logits(n, v, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=dtype) * 2


# ---------------------------------------------------------------------------------------------
# The loss


@pytest.mark.parametrize("name,params", [("reverse_kl", {}), ("generalized_jsd", {"beta": 0.5})])
def test_identical_vocabularies_reduce_to_the_plain_divergence(name, params):
    zs, zt = _logits(5, 9, 0), _logits(5, 9, 1)
    ids = torch.arange(9)
    got = gold_loss(zs, zt, ids, ids, temperature=1.5, uld_weight=3.0, divergence=name, **params)
    want = divergence(name, zs, zt, temperature=1.5, **params)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (got > 0).all()


def test_identity_holds_under_a_relabelling_of_the_teacher_vocabulary():
    # teacher id perm[v] is student id v: matched through the map, nothing left for ULD
    zs, zt_student_order = _logits(4, 8, 2), _logits(4, 8, 3)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    zt = torch.empty_like(zt_student_order)
    zt[:, perm] = zt_student_order
    got = gold_loss(zs, zt, torch.arange(8), perm, uld_weight=5.0)
    torch.testing.assert_close(got, divergence("reverse_kl", zs, zt_student_order))


def test_uld_part_is_zero_when_sorted_remainders_agree_and_positive_otherwise():
    zs = _logits(3, 6, 4)
    ms, mt = torch.tensor([0, 1]), torch.tensor([0, 1])
    # teacher = student with the unmatched tokens 2..5 shuffled (and 2 zero-mass extra ids)
    zt = torch.full((3, 8), -1e4, dtype=torch.float64)
    zt[:, :2] = zs[:, :2]
    zt[:, torch.tensor([5, 2, 7, 3])] = zs[:, 2:]
    uld_only = gold_loss(zs, zt, ms, mt, matched_weight=0.0, uld_weight=1.0)
    torch.testing.assert_close(uld_only, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-9)
    matched = gold_loss(zs, zt, ms, mt, matched_weight=1.0, uld_weight=0.0)
    torch.testing.assert_close(matched, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-9)
    other = _logits(3, 8, 5)
    assert (gold_loss(zs, other, ms, mt, matched_weight=0.0) > 1e-3).all()


def test_sorted_l1_pads_the_shorter_vector_with_zeros_and_bounds_the_mass_gap():
    a = torch.tensor([[0.1, 0.5, 0.2]])
    b = torch.tensor([[0.3, 0.1]])
    # sorted: [0.5, 0.2, 0.1] vs [0.3, 0.1, 0]: 0.2 + 0.1 + 0.1
    torch.testing.assert_close(sorted_l1(a, b), torch.tensor([0.4]))
    zs, zt = _logits(6, 7, 6), _logits(6, 9, 7)
    ms, mt = torch.tensor([0, 3]), torch.tensor([4, 1])
    uld = gold_loss(zs, zt, ms, mt, matched_weight=0.0)
    q_m = torch.softmax(zs, -1)[:, ms].sum(-1)
    p_m = torch.softmax(zt, -1)[:, mt].sum(-1)
    assert (uld >= (q_m - p_m).abs() - 1e-12).all()


def test_value_is_the_weighted_sum_of_its_parts():
    zs, zt = _logits(4, 7, 8), _logits(4, 10, 9)
    ms, mt = torch.tensor([1, 2, 6]), torch.tensor([9, 0, 3])
    d = gold_loss(zs, zt, ms, mt, matched_weight=1.0, uld_weight=0.0)
    u = gold_loss(zs, zt, ms, mt, matched_weight=0.0, uld_weight=1.0)
    both = gold_loss(zs, zt, ms, mt, matched_weight=0.3, uld_weight=2.0)
    torch.testing.assert_close(both, 0.3 * d + 2.0 * u)
    # the matched part is the divergence of the renormalised matched sub-distributions
    torch.testing.assert_close(d, divergence("reverse_kl", zs[:, ms], zt[:, mt]))
    rest = complement_ids(mt, 10)
    assert rest.tolist() == [1, 2, 4, 5, 6, 7, 8]


def test_gradcheck_float64():
    zs = _logits(3, 6, 10).requires_grad_()
    zt = _logits(3, 8, 11)
    ms, mt = torch.tensor([0, 4]), torch.tensor([7, 2])
    assert torch.autograd.gradcheck(
        lambda z: gold_loss(z, zt, ms, mt, temperature=0.7, matched_weight=0.5, uld_weight=1.3),
        (zs,),
    )


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunked_path_equals_the_reference_in_value_and_gradient(chunk_size):
    g = torch.Generator().manual_seed(12)
    h_s = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W_s = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(7, 4, generator=g, dtype=torch.float64)
    W_t = torch.randn(13, 4, generator=g, dtype=torch.float64)
    ms, mt = torch.tensor([0, 2, 5, 9]), torch.tensor([12, 1, 5, 3])
    kw = dict(temperature=1.3, matched_weight=0.7, uld_weight=1.5)
    ref = gold_loss(h_s @ W_s.T, h_t @ W_t.T, ms, mt, **kw)
    got = chunked_gold_loss(h_s, W_s, h_t, W_t, ms, mt, chunk_size=chunk_size, **kw)
    torch.testing.assert_close(got, ref)
    w = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)
    g_ref = torch.autograd.grad((ref * w).sum(), (h_s, W_s))
    g_got = torch.autograd.grad((got * w).sum(), (h_s, W_s))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)


def test_bad_matches_are_refused():
    zs, zt = _logits(2, 4, 0), _logits(2, 5, 1)
    with pytest.raises(ValueError, match="one-to-one"):
        gold_loss(zs, zt, torch.tensor([0, 0]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="out of range"):
        gold_loss(zs, zt, torch.tensor([4]), torch.tensor([1]))
    with pytest.raises(ValueError, match="temperature"):
        gold_loss(zs, zt, torch.tensor([0]), torch.tensor([1]), temperature=0.0)


# ---------------------------------------------------------------------------------------------
# Vocabulary matches


def test_piece_bytes_for_byte_level_and_sentencepiece_entries():
    assert piece_bytes("Ġthe", "byte_level") == b" the"
    assert piece_bytes("Ċ", "byte_level") == b"\n"
    assert piece_bytes("Ã©", "byte_level") == "é".encode()
    assert piece_bytes("▁the", "sentencepiece") == b" the"
    assert piece_bytes("<0xC3>", "sentencepiece") == b"\xc3"
    assert piece_bytes("ab", "plain") == b"ab"


def test_exact_matches_are_one_to_one_and_skip_special_tokens():
    student = [None, b"a", b" the", b"x", b"a"]  # id 4 repeats id 1's bytes
    teacher = [b" the", None, b"a", b"q", b"a", b""]
    ids_s, ids_t = exact_matches(student, teacher)
    assert ids_s.tolist() == [1, 2]
    assert ids_t.tolist() == [2, 0]


def test_vocab_matches_of_two_character_tokenizers():
    s_tok, t_tok = char_tokenizer(), char_tokenizer("cab!")
    ids_s, ids_t = vocab_matches(s_tok, t_tok, len(s_tok), len(t_tok))
    names = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "!"]
    assert [s_tok.convert_ids_to_tokens(i) for i in ids_s.tolist()] == names
    assert [t_tok.convert_ids_to_tokens(i) for i in ids_t.tolist()] == names
    assert vocab_bytes(s_tok, 6)[:5] == [None] * 5  # special tokens have no bytes...
    assert vocab_keys(s_tok, 6)[4] == ("special", "<|im_end|>")  # ...they match by name
    # identical tokenizers: every id matches itself; padded model rows never match
    ids_s, ids_t = vocab_matches(s_tok, s_tok, len(s_tok) + 3, len(s_tok))
    assert ids_s.tolist() == ids_t.tolist() == list(range(len(s_tok)))


CORPUS = [
    "the cat sat on the mat. 12+30=42 and 7+8=15",
    "then the other cat said hello to the world",
    "héllo wörld: naïve café, 3+4=7, the end",
] * 4


def bpe_tokenizer(kind: str, vocab_size: int):
    """A tiny trained BPE tokenizer: byte-level (GPT-2 style) or SentencePiece-style
    (Metaspace + byte-fallback <0xNN> entries), with opd.tiny's special tokens."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from opd.tiny import BOS, CHATML_TEMPLATE, EOS, IM_END, IM_START, PAD, SPECIAL_TOKENS

    core = Tokenizer(models.BPE())
    if kind == "byte_level":
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        core.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    if kind == "sentencepiece":  # byte-fallback entries as ordinary vocabulary tokens
        spec = json.loads(core.to_str())
        vocab = spec["model"]["vocab"]
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        spec["model"]["byte_fallback"] = True
        core = Tokenizer.from_str(json.dumps(spec))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    return tok


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_token_bytes_of_trained_tokenizers_rebuild_the_text(kind):
    tok = bpe_tokenizer(kind, 120)
    assert tokenizer_kind(tok) == kind
    table = vocab_bytes(tok, len(tok))
    for text in ["the cat said hello", "naïve 12+30=42", "unseen ✓ glyph"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(table[i] for i in ids) == text.encode("utf-8"), (kind, text)
    if kind == "sentencepiece":
        assert table[tok.convert_tokens_to_ids("<0xE2>")] == b"\xe2"


def test_byte_level_and_sentencepiece_vocabularies_match_on_bytes():
    bl, sp = bpe_tokenizer("byte_level", 330), bpe_tokenizer("sentencepiece", 120)
    ids_s, ids_t = vocab_matches(bl, sp, len(bl), len(sp))
    pairs = {
        bl.convert_ids_to_tokens(s): sp.convert_ids_to_tokens(t)
        for s, t in zip(ids_s.tolist(), ids_t.tolist())
    }
    assert pairs["Ġthe"] == "▁the" and pairs["<|im_end|>"] == "<|im_end|>"
    assert len(set(pairs.values())) == len(pairs)  # one-to-one


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
    pytest.importorskip("opd.crosstok.align")
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
    pytest.importorskip("opd.crosstok.align")
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
    import json

    pytest.importorskip("opd.crosstok.evaluate")
    helpers = pytest.importorskip("tests.test_crosstok_train")
    from opd.crosstok.evaluate import teacher_nll_per_byte
    from opd.crosstok.models import cross_tokenizer_models

    from opd.data.sets import build_data
    from opd.recipes import get_recipe
    from opd.tiny import tiny_llama
    from opd.train import distill
    from tests.helpers import tiny_cfg, write_prompts
    from tests.test_crosstok_tokenizers import byte_level_tok, sentencepiece_tok

    s_tok, t_tok = sentencepiece_tok(420), byte_level_tok(300)
    pf = write_prompts(tmp_path / "p.jsonl", n=16)
    teacher = helpers.trained_teacher(t_tok, [json.loads(x)["prompt"] for x in open(pf)])
    student = tiny_llama(len(s_tok), hidden=48, layers=2, seed=4)
    cfg = tiny_cfg(
        tmp_path,
        pf,
        "method.recipe=xtok_gold",
        "train.steps=30",
        "data.chat_template=auto",
        "sampling.max_new_tokens=12",
        "train.batch_size=8",
        "model.student=student",
        "model.teacher=teacher",
    )
    method = get_recipe("xtok_gold").build()
    models = cross_tokenizer_models(cfg, method, teacher, student, s_tok, t_tok)
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
