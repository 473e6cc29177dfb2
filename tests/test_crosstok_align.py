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
@pytest.mark.parametrize("mask", [False, True])
def test_spans_cover_every_byte_once_in_order(toks, s_name, t_name, mask):
    """Random multi-byte texts and random (non-canonical, special-laden) token sequences:
    the spans partition both token sequences in order, and each aligned span holds the same
    bytes on both sides, so the aligned and masked spans cover the completion's bytes once."""
    s_tok, t_tok = toks[s_name], toks[t_name]
    sb, tb = TokenBytes(s_tok), TokenBytes(t_tok)
    rng = random.Random(0)
    n_masked = n_aligned = n_replaced = 0
    for seed in range(150):
        if seed % 3 == 2:  # what a random student samples: any id, specials included
            ids = [rng.randrange(len(s_tok)) for _ in range(rng.randint(0, 25))]
        else:
            ids = s_tok(_random_text(rng), add_special_tokens=False).input_ids
            ids = ids + [s_tok.eos_token_id] if seed % 2 else ids
        al = align_completion(ids, sb, tb, mask_invalid=mask, literal_specials=not mask)
        # student and teacher positions: each exactly once, in order
        assert [i for sp in al.spans for i in range(sp.s_start, sp.s_end)] == list(range(len(ids)))
        assert [u for sp in al.spans for u in range(sp.t_start, sp.t_end)] == list(
            range(len(al.teacher_ids))
        )
        s_parts = _bytes_of(sb, ids)
        t_parts = _bytes_of(tb, al.teacher_ids)
        covered = b""
        for k, sp in enumerate(al.spans):
            s_bytes = b"".join(b or b"" for b in s_parts[sp.s_start : sp.s_end])
            covered += s_bytes
            if sp.aligned and s_parts[sp.s_start] is None:  # a special: its own span
                assert sp.student_len == 1
                t_ids = al.teacher_ids[sp.t_start : sp.t_end]
                literal = t_tok.decode(t_ids).strip()
                assert (len(t_ids) == 1 and t_parts[sp.t_start] is None) or literal == (
                    s_tok.convert_ids_to_tokens(ids[sp.s_start])
                )
                n_aligned += 1
            elif sp.aligned:
                t_bytes = b"".join(b or b"" for b in t_parts[sp.t_start : sp.t_end])
                # invalid UTF-8 is scored as the U+FFFD the teacher reads (one per invalid
                # run, as bytes.decode(errors="replace")), never split across spans
                fixed = s_bytes.decode("utf-8", errors="replace").encode()
                # the teacher's dummy prefix space may open a text run (start, after a special)
                run_start = k == 0 or s_parts[al.spans[k - 1].s_end - 1] is None
                if run_start and t_bytes[:1] == b" " and s_bytes[:1] != b" ":
                    t_bytes = t_bytes[1:]
                assert t_bytes in (s_bytes, fixed), (s_bytes, t_bytes)
                n_replaced += t_bytes != s_bytes
                n_aligned += 1
            else:
                n_masked += sp.student_len
        assert covered == b"".join(b or b"" for b in s_parts)
        if seed % 3 != 2:  # canonical text tokens of valid UTF-8: nothing is masked
            assert all(sp.aligned for sp in al.spans), (ids, al.spans)
    assert n_aligned > 500  # and the special cases were exercised:
    assert n_masked > 0 if mask else n_replaced > 0


def test_invalid_utf8_scored_as_replacement_or_masked(toks):
    bl, sp = TokenBytes(toks["bl300"]), TokenBytes(toks["sp420"])
    ids = toks["bl300"]("a 你", add_special_tokens=False).input_ids
    byte_ids = [toks["bl300"].convert_tokens_to_ids(bytes_to_unicode()[b]) for b in "你".encode()]
    cut = toks["bl300"]("a ", add_special_tokens=False).input_ids + byte_ids[:2]  # cut char
    scored = align_completion(cut, bl, sp)  # default: against the teacher's U+FFFD
    assert scored.unaligned_tokens == 0 and scored.spans[-1].aligned
    assert toks["sp420"].decode(scored.teacher_ids).endswith("\ufffd")
    assert scored.spans[-1].s_end - scored.spans[-1].s_start >= 2  # both cut bytes, one span
    masked = align_completion(cut, bl, sp, mask_invalid=True)
    assert masked.unaligned_tokens >= 2 and masked.spans[0].aligned
    assert masked.teacher_ids == scored.teacher_ids
    assert align_completion(ids, bl, sp, mask_invalid=True).unaligned_tokens == 0


def test_missing_special_scored_as_literal_text_or_masked(toks):
    bl, sp = TokenBytes(toks["bl300"]), TokenBytes(toks["sp420"])
    im_start = toks["bl300"].convert_tokens_to_ids("<|im_start|>")
    ids = toks["bl300"]("the", add_special_tokens=False).input_ids + [im_start]
    literal = align_completion(ids, bl, sp)
    assert literal.unaligned_tokens == 0
    assert toks["sp420"].decode(literal.teacher_ids).replace(" ", "") == "the<|im_start|>"
    masked = align_completion(ids, bl, sp, literal_specials=False)
    assert masked.unaligned_tokens == 1 and not masked.spans[-1].aligned


def test_raw_prompt_rendered_with_the_teachers_template(toks):
    s_tok, t_tok = toks["bl300"], toks["sp420"]
    rows = [Row(prompt="the cat", completion=None, answer=None, source="m:0", messages=None)]
    ex = encode_rows(rows, s_tok, use_chat_template=True).examples[0]
    assert ex.prompt_text.startswith("<|im_start|>user\nthe cat")
    ids = render_prompt(ex.raw_prompt, t_tok, ex.prompt_text)
    assert t_tok.decode(ids) == "<s>[INST] the cat [/INST]"
    plain = encode_rows(rows, s_tok, use_chat_template=False).examples[0]
    assert plain.raw_prompt == "the cat"
