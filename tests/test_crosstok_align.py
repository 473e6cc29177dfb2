"""Cross-tokenizer alignment: token bytes of two tokenizer families and the span property."""

from __future__ import annotations

import random

import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from opd.crosstok import Span, TokenBytes, align_completion, align_spans, tokenizer_family
from opd.crosstok.access import render_prompt
from opd.crosstok.bytes import unicode_to_byte
from opd.data.encode import encode_rows
from opd.data.rows import Row
from opd.tiny import IM_END
from tests.test_crosstok_tokenizers import byte_level_tok, sentencepiece_tok


@pytest.fixture(scope="module")
def toks():
    return {
        "bl300": byte_level_tok(300),
        "bl360": byte_level_tok(360),
        "sp420": sentencepiece_tok(420),
    }


def test_align_spans_small_cases():
    assert align_spans([b"ab", b"c", b"d"], [b"a", b"bcd"]) == [Span(0, 3, 0, 2)]
    assert align_spans([b"ab", b"c"], [b"ab", b"c"]) == [Span(0, 1, 0, 1), Span(1, 2, 1, 2)]
    # a zero-byte token on one side joins the span after it
    assert align_spans([b"a", b"", b"b"], [b"a", b"b"]) == [Span(0, 1, 0, 1), Span(1, 3, 1, 2)]
    # differing bytes: aligned up to the last shared cut, then one masked span
    assert align_spans([b"ab", b"cX"], [b"a", b"b", b"cY"]) == [
        Span(0, 1, 0, 2),
        Span(1, 2, 2, 3, aligned=False),
    ]
    assert align_spans([], []) == []


def test_byte_tables_and_families(toks):
    assert unicode_to_byte() == {c: b for b, c in bytes_to_unicode().items()}
    assert tokenizer_family(toks["bl300"]) == "byte_level"
    assert tokenizer_family(toks["sp420"]) == "sentencepiece"
    sp, bl = TokenBytes(toks["sp420"]), TokenBytes(toks["bl300"])
    assert sp.of(toks["sp420"].convert_tokens_to_ids("<0xE4>")) == b"\xe4"
    assert sp.of(toks["sp420"].convert_tokens_to_ids("▁the")) == b" the"
    assert bl.of(toks["bl300"].convert_tokens_to_ids("Ġc")) == b" c"
    assert bl.of(toks["bl300"].eos_token_id) is None  # specials stand for no bytes
    # the student's end-of-turn maps to the teacher's: same string, else its turn end / eos
    im_end = toks["bl300"].convert_tokens_to_ids(IM_END)
    assert bl.map_special(im_end, sp) == toks["sp420"].eos_token_id
    assert bl.map_special(im_end, TokenBytes(toks["bl360"])) == toks["bl360"].convert_tokens_to_ids(
        IM_END
    )
    assert sp.map_special(toks["sp420"].pad_token_id, bl) == toks["bl300"].pad_token_id


def _bytes_of(tb: TokenBytes, ids):
    return [tb.of(i) for i in ids]


def _random_text(rng: random.Random) -> str:
    alphabet = "ab cat sat 0123+=.\n\té ü 你好 🙂 ∑→"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))


@pytest.mark.parametrize(
    ("s_name", "t_name"), [("bl300", "sp420"), ("sp420", "bl300"), ("bl300", "bl360")]
)
def test_spans_cover_every_byte_once_in_order(toks, s_name, t_name):
    """Random multi-byte texts and random (non-canonical, special-laden) token sequences:
    the spans partition both token sequences in order, and each aligned span holds the same
    bytes on both sides, so the aligned and masked spans cover the completion's bytes once."""
    s_tok, t_tok = toks[s_name], toks[t_name]
    sb, tb = TokenBytes(s_tok), TokenBytes(t_tok)
    rng = random.Random(0)
    n_masked = n_aligned = 0
    for seed in range(150):
        if seed % 3 == 2:  # what a random student samples: any id, specials included
            ids = [rng.randrange(len(s_tok)) for _ in range(rng.randint(0, 25))]
        else:
            ids = s_tok(_random_text(rng), add_special_tokens=False).input_ids
            ids = ids + [s_tok.eos_token_id] if seed % 2 else ids
        al = align_completion(ids, sb, tb)
        # student and teacher positions: each exactly once, in order
        assert [i for sp in al.spans for i in range(sp.s_start, sp.s_end)] == list(range(len(ids)))
        assert [u for sp in al.spans for u in range(sp.t_start, sp.t_end)] == list(
            range(len(al.teacher_ids))
        )
        s_parts = _bytes_of(sb, ids)
        t_parts = _bytes_of(tb, al.teacher_ids)
        covered = b""
        for sp in al.spans:
            s_bytes = b"".join(b or b"" for b in s_parts[sp.s_start : sp.s_end])
            covered += s_bytes
            if sp.aligned:
                t_bytes = b"".join(b or b"" for b in t_parts[sp.t_start : sp.t_end])
                # the teacher's dummy prefix space may open a text run (start, after a special)
                run_start = sp.t_start == 0 or t_parts[sp.t_start - 1] is None
                assert t_bytes == s_bytes or (run_start and t_bytes == b" " + s_bytes)
                n_aligned += 1
            else:
                n_masked += sp.student_len
        assert covered == b"".join(b or b"" for b in s_parts)
        if seed % 3 != 2:  # canonical text tokens of valid UTF-8: nothing is masked
            assert all(sp.aligned for sp in al.spans), (ids, al.spans)
    assert n_aligned > 500 and n_masked > 0  # both kinds were exercised


def test_invalid_utf8_is_masked_and_counted(toks):
    bl, sp = TokenBytes(toks["bl300"]), TokenBytes(toks["sp420"])
    ids = toks["bl300"]("a 你", add_special_tokens=False).input_ids
    byte_ids = [toks["bl300"].convert_tokens_to_ids(bytes_to_unicode()[b]) for b in "你".encode()]
    cut = toks["bl300"]("a ", add_special_tokens=False).input_ids + byte_ids[:2]  # cut char
    al = align_completion(cut, bl, sp)
    assert al.unaligned_tokens >= 2 and al.spans[0].aligned
    assert "\ufffd" in toks["sp420"].decode(al.teacher_ids)
    assert align_completion(ids, bl, sp).unaligned_tokens == 0


def test_raw_prompt_rendered_with_the_teachers_template(toks):
    s_tok, t_tok = toks["bl300"], toks["sp420"]
    rows = [Row(prompt="the cat", completion=None, answer=None, source="m:0", messages=None)]
    ex = encode_rows(rows, s_tok, use_chat_template=True).examples[0]
    assert ex.prompt_text.startswith("<|im_start|>user\nthe cat")
    ids = render_prompt(ex.raw_prompt, t_tok, ex.prompt_text)
    assert t_tok.decode(ids) == "<s>[INST] the cat [/INST]"
    plain = encode_rows(rows, s_tok, use_chat_template=False).examples[0]
    assert plain.raw_prompt == "the cat"
