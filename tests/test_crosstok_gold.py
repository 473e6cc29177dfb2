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


def test_gold_signal_puts_values_at_the_pairs_and_zeros_elsewhere():
    from opd.context import StepContext
    from opd.crosstok.gold import GoldSignal, SpanPairScores
    from opd.step import NonFiniteError
    from opd.types import StudentRows

    g = torch.Generator().manual_seed(3)
    h_s = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W_s = torch.randn(7, 4, generator=g, dtype=torch.float64)
    h_t = torch.randn(3, 6, generator=g, dtype=torch.float64)
    W_t = torch.randn(9, 6, generator=g, dtype=torch.float64)
    ms, mt = torch.tensor([1, 2, 5]), torch.tensor([0, 8, 4])
    scores = SpanPairScores(
        pair_student_P=torch.tensor([0, 2, 3]),
        pair_hidden_PE=h_t,
        pair_head_UE=W_t,
        match_s_M=ms,
        match_t_M=mt,
        masked_tokens=2,
    )
    rows = StudentRows(h_s, W_s, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    signal = GoldSignal(uld_weight=0.5, divergence="generalized_jsd", params={"beta": 0.5})
    ctx = StepContext(chunk_size=2)
    values = signal(rows, scores, ctx)
    want = gold_loss(
        h_s[[0, 2, 3]] @ W_s.T,
        h_t @ W_t.T,
        ms,
        mt,
        uld_weight=0.5,
        divergence="generalized_jsd",
        beta=0.5,
    )
    torch.testing.assert_close(values[[0, 2, 3]], want)
    assert values[1] == 0 and values[4] == 0
    (grad,) = torch.autograd.grad(values.sum(), h_s)
    assert grad[[1, 4]].abs().sum() == 0 and grad[[0, 2, 3]].abs().sum() > 0
    assert ctx.metrics["gold_pairs"] == 3 and ctx.metrics["gold_masked_tokens"] == 2
    bad = SpanPairScores(**{**scores.__dict__, "pair_hidden_PE": h_t * float("nan")})
    with pytest.raises(NonFiniteError, match="not finite"):
        signal(rows, bad, ctx)
