"""Span alignment of two tokenisations of the same bytes.

Two tokenisations of one byte string b (student tokens s_1..s_n, teacher tokens u_1..u_m)
each cut b at their token boundaries. A span is a shortest run of student tokens and teacher
tokens that ends where BOTH tokenisations cut b:

    cuts_S = {|s_1|, |s_1 s_2|, ...},  cuts_U = {|u_1|, |u_1 u_2|, ...}
    span ends = cuts_S ∩ cuts_U   (in order; the last one is |b|)

so span g covers the student tokens [s_start, s_end) and the teacher tokens [t_start, t_end)
and both cover exactly the same bytes. With identical tokenisations every span is one token.

A zero-byte token (one that decodes to nothing) on one side only joins the span that follows
it (the last span when it comes at the end); zero-byte tokens at the same place on both sides
pair up like any other shared cut. When the two byte strings differ (a lossy tokeniser), the
spans run up to the last shared cut inside the common prefix; everything after it is one span
marked `aligned=False` (the caller masks it and counts it).

`align_completion` applies this to a student completion (token ids): the completion is cut
at its special tokens (each one its own span, mapped to the teacher's counterpart, e.g. the
student's '<|im_end|>' or eos to the teacher's end-of-turn; a special the teacher lacks is
scored as its literal text, e.g. '<|im_start|>' as 12 characters, or masked with
`literal_specials=False`); each run of text tokens is turned into bytes, decoded as UTF-8,
tokenised by the teacher, and the two byte sequences aligned. A teacher that prepends a dummy
space to the text (SentencePiece's '▁' prefix) has that byte dropped before aligning. A
student token with no bytes that is not special masks its span.

Invalid UTF-8 (a cut or impossible byte sequence) becomes U+FFFD in the text the teacher
reads. With `mask_invalid=True` every span touching it is masked; by default (False) the
span is aligned with the teacher's tokens of that U+FFFD (the student's invalid bytes count
as one replacement character). Deviation from masking them: in a measured run, masked
spans got no gradient, so the student learned to write ever more invalid bytes to escape
the teacher's penalty (its teacher NLL per byte rose); scored against U+FFFD they are
penalised like any text the teacher finds unlikely.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

REPLACEMENT = "\ufffd".encode()  # what an invalid UTF-8 sequence becomes in the text


@dataclass(frozen=True)
class Span:
    """Student tokens [s_start, s_end) and teacher tokens [t_start, t_end) over the same bytes.

    Attributes:
      s_start, s_end: half-open range of student token indices.
      t_start, t_end: half-open range of teacher token indices.
      aligned: False when the two sides are not known to cover the same bytes (masked).
    """

    s_start: int
    s_end: int
    t_start: int
    t_end: int
    aligned: bool = True

    @property
    def student_len(self) -> int:
        return self.s_end - self.s_start

    @property
    def teacher_len(self) -> int:
        return self.t_end - self.t_start


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def align_offsets(student_ends: list[int], teacher_ends: list[int]) -> list[Span]:
    """Spans from the cumulative byte end of every token on each side (non-decreasing lists).

    A span closes at every offset that both sides reach; tokens whose end does not move the
    offset (zero-byte tokens) stay with the span that follows. Assumes both lists end at the
    same total; tokens past a side's last shared cut go into one final span.
    """
    spans: list[Span] = []
    i = j = 0  # next student / teacher token
    si = tj = 0  # start of the open span
    n, m = len(student_ends), len(teacher_ends)
    while i < n and j < m:
        a, b = student_ends[i], teacher_ends[j]
        if a < b:
            i += 1
        elif b < a:
            j += 1
        else:  # a shared cut: the open span ends here on both sides
            i += 1
            j += 1
            spans.append(Span(si, i, tj, j))
            si, tj = i, j
    if si < n or tj < m:  # leftovers: zero-byte tails, or whatever follows the last shared cut
        if spans and _tail_is_empty(student_ends, si, teacher_ends, tj):
            last = spans.pop()
            spans.append(Span(last.s_start, n, last.t_start, m, last.aligned))
        else:
            spans.append(Span(si, n, tj, m))
    return spans


def _tail_is_empty(s_ends: list[int], si: int, t_ends: list[int], tj: int) -> bool:
    """True when the tokens from si / tj on add no bytes (zero-byte tokens at the end)."""
    s0 = s_ends[si - 1] if si else 0
    t0 = t_ends[tj - 1] if tj else 0
    return all(e == s0 for e in s_ends[si:]) and all(e == t0 for e in t_ends[tj:])


def align_spans(student_bytes: list[bytes], teacher_bytes: list[bytes]) -> list[Span]:
    """Group two tokenisations of the same bytes into spans with a shared byte boundary.

    Args:
      student_bytes: the bytes of each student token, in order.
      teacher_bytes: the bytes of each teacher token, in order.

    Returns:
      Spans in order, covering every student and every teacher token exactly once. When
      b"".join(student_bytes) != b"".join(teacher_bytes), the part after the last shared cut
      within their common prefix is a single span with `aligned=False`.
    """
    s_ends = list(accumulate(len(x) for x in student_bytes))
    t_ends = list(accumulate(len(x) for x in teacher_bytes))
    s_all, t_all = b"".join(student_bytes), b"".join(teacher_bytes)
    if s_all == t_all:
        return align_offsets(s_ends, t_ends)
    common = _common_prefix(s_all, t_all)
    # align the prefix [0, common): cut both sides at their last token end <= common
    ns = sum(1 for e in s_ends if e <= common)
    nt = sum(1 for e in t_ends if e <= common)
    shared = sorted(set(s_ends[:ns]) & set(t_ends[:nt]))
    last = shared[-1] if shared else 0
    ns = sum(1 for e in s_ends if e <= last)
    nt = sum(1 for e in t_ends if e <= last)
    spans = align_offsets(s_ends[:ns], t_ends[:nt]) if last > 0 else []
    s0 = spans[-1].s_end if spans else 0
    t0 = spans[-1].t_end if spans else 0
    if s0 < len(s_ends) or t0 < len(t_ends):
        spans.append(Span(s0, len(s_ends), t0, len(t_ends), aligned=False))
    return spans


@dataclass
class Alignment:
    """A student completion and the teacher's tokenisation of the same text.

    Attributes:
      teacher_ids: the teacher's token ids of the completion (specials mapped).
      spans: spans over student positions [0, n) and teacher positions [0, len(teacher_ids)).
    """

    teacher_ids: list
    spans: list

    @property
    def unaligned_tokens(self) -> int:
        """Student tokens in spans that are masked."""
        return sum(sp.student_len for sp in self.spans if not sp.aligned)


def utf8_pieces(data: bytes) -> list[tuple[int, int, bool]]:
    """(start, end, valid) runs of `data`: maximal valid UTF-8 runs and the invalid bytes
    between them (each invalid run is what one U+FFFD replaces)."""
    out, pos = [], 0
    while pos < len(data):
        try:
            data[pos:].decode("utf-8")
            out.append((pos, len(data), True))
            break
        except UnicodeDecodeError as err:
            if err.start > 0:
                out.append((pos, pos + err.start, True))
            out.append((pos + err.start, pos + err.end, False))
            pos += err.end
    return out


def _normalised(
    token_bytes: list[bytes], mask_invalid: bool
) -> tuple[list[bytes], list[bool], str, list[tuple[int, int]]]:
    """Per-token bytes with each invalid run replaced by U+FFFD (given to the token holding
    its last byte), per-token 'masked' flags, the text the teacher reads, and the invalid
    runs (start, end) as raw byte offsets."""
    data = b"".join(token_bytes)
    pieces = utf8_pieces(data)
    piece_of = []  # piece index of every byte
    for k, (a, b, _) in enumerate(pieces):
        piece_of += [k] * (b - a)
    norm, bad, pos = [], [], 0
    for tb in token_bytes:
        out, touched = bytearray(), False
        for p in range(pos, pos + len(tb)):
            start, end, valid = pieces[piece_of[p]]
            if valid:
                out.append(data[p])
            else:
                touched = True
                if p == end - 1:
                    out += REPLACEMENT
        pos += len(tb)
        norm.append(bytes(out))
        bad.append((touched and mask_invalid) or not tb)
    text = "".join(data[a:b].decode("utf-8") if valid else "\ufffd" for a, b, valid in pieces)
    invalid = [(a, b) for a, b, valid in pieces if not valid]
    return norm, bad, text, invalid


def _merge_split_runs(spans: list[Span], raw_ends: list[int], invalid) -> list[Span]:
    """Merge neighbouring spans whose boundary falls inside an invalid UTF-8 run, so each run
    (and its U+FFFD on the teacher's side) lies in one span."""
    out: list[Span] = []
    for sp in spans:
        cut = raw_ends[sp.s_start - 1] if sp.s_start > 0 else 0
        if out and any(a < cut < b for a, b in invalid):
            last = out.pop()
            sp = Span(last.s_start, sp.s_end, last.t_start, sp.t_end, last.aligned and sp.aligned)
        out.append(sp)
    return out


def _teacher_encode(tokenizer, text: str) -> list[int]:
    """The teacher's ids of plain text: special-token strings in it stay text."""
    try:
        enc = tokenizer(text, add_special_tokens=False, split_special_tokens=True)
    except TypeError:  # a tokenizer without split_special_tokens
        enc = tokenizer(text, add_special_tokens=False)
    return [int(i) for i in enc["input_ids"]]


def align_text_run(token_bytes: list[bytes], teacher, mask_invalid: bool = False) -> Alignment:
    """Align a run of student text tokens (their bytes) with the teacher's tokenisation.

    Args:
      token_bytes: the bytes of each student token (none of them special).
      teacher: the teacher's `opd.crosstok.bytes.TokenBytes`.
      mask_invalid: mask the spans that touch invalid UTF-8 (module docstring).
    """
    norm, bad, text, invalid = _normalised(token_bytes, mask_invalid)
    ids = _teacher_encode(teacher.tokenizer, text) if text else []
    t_bytes = [teacher.of(t) or b"" for t in ids]
    target = b"".join(norm)
    got = b"".join(t_bytes)
    if got != target and got == b" " + target and t_bytes and t_bytes[0][:1] == b" ":
        t_bytes[0] = t_bytes[0][1:]  # the dummy prefix space of SentencePiece-style tokenizers
    spans = []
    found = align_spans(norm, t_bytes)
    if invalid:
        found = _merge_split_runs(found, list(accumulate(len(b) for b in token_bytes)), invalid)
    for sp in found:
        ok = sp.aligned and not any(bad[sp.s_start : sp.s_end]) and sp.teacher_len > 0
        spans.append(Span(sp.s_start, sp.s_end, sp.t_start, sp.t_end, ok))
    return Alignment(ids, spans)


def align_completion(
    student_ids, student, teacher, mask_invalid: bool = False, literal_specials: bool = True
) -> Alignment:
    """Align a student completion with the teacher's tokenisation of the same text.

    Args:
      student_ids: the student's completion token ids.
      student, teacher: `opd.crosstok.bytes.TokenBytes` of the two tokenizers.
      mask_invalid: mask spans touching invalid UTF-8 instead of scoring them as U+FFFD.
      literal_specials: score a special the teacher lacks as its literal text (else mask).

    Returns:
      An `Alignment`; its spans cover every student position once, in order.
    """
    teacher_ids, spans, run = [], [], []

    def flush():
        if not run:
            return
        part = align_text_run([student.of(student_ids[i]) for i in run], teacher, mask_invalid)
        s0, t0 = run[0], len(teacher_ids)
        for sp in part.spans:
            spans.append(
                Span(sp.s_start + s0, sp.s_end + s0, sp.t_start + t0, sp.t_end + t0, sp.aligned)
            )
        teacher_ids.extend(part.teacher_ids)
        run.clear()

    for i, sid in enumerate(student_ids):
        if student.of(sid) is not None:
            run.append(i)
            continue
        flush()
        tid = student.map_special(sid, teacher)
        t0 = len(teacher_ids)
        literal = student.tokenizer.convert_ids_to_tokens(int(sid)) if tid is None else None
        if tid is None and literal_specials and literal:
            ids = _teacher_encode(teacher.tokenizer, literal)
            teacher_ids.extend(ids)
            spans.append(Span(i, i + 1, t0, t0 + len(ids), aligned=bool(ids)))
        elif tid is None:
            spans.append(Span(i, i + 1, t0, t0, aligned=False))
        else:
            teacher_ids.append(tid)
            spans.append(Span(i, i + 1, t0, t0 + 1))
    flush()
    return Alignment(teacher_ids, spans)
