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
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate


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
