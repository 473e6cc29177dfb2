"""Wire formats of served teachers: request bodies and response parsers (no I/O here).

A served teacher scores a rollout row by reading the log-probabilities of its *prompt*: the
row's token ids (prompt + completion, padding dropped) are sent as the prompt, and the entry at
unpadded index j is the teacher's distribution p(· | ids[:j]) that predicts ids[j]. Entry 0 has
no context and is null in every server.

vLLM (and `opd serve-teacher`, which speaks the same subset), `POST /v1/completions`:

    {"model", "prompt": [ids] | [[ids], ...], "max_tokens": 1, "temperature": τ,
     "prompt_logprobs": k}
    -> choices[i].prompt_logprobs = [null, {"<id>": {"logprob", "rank", "decoded_token"}, ...}]

  Each entry holds the k most likely ids (ranks 1..k) plus the realised token ids[j] with its
  own vocabulary rank (≥ 1), so k or k + 1 keys, in no particular order. The top-k is read by
  rank: the non-realised ids, ranked, plus the realised id where it fills a gap in those ranks,
  then the longest run of ranks 1, 2, 3, ... (so a realised token outside the top-k, rank > k,
  is never taken for a top-k member, and ties that give two ids one rank never invent one).

SGLang, `POST /generate`:

    {"input_ids": [ids] | [[ids], ...], "sampling_params": {"max_new_tokens": 0,
     "temperature": τ}, "return_logprob": true, "logprob_start_len": 0, "top_logprobs_num": k}
    -> meta_info.input_token_logprobs = [[logprob|null, id, text|null], ...]
       meta_info.input_top_logprobs   = [null, [[logprob, id, text], ...] (descending), ...]

  one object per input (a list for a batch). Whether the first (null) position is present
  varies; the parser aligns the list on the ids it echoes and refuses a mismatch.

Deviations, shared by both: ids ≥ `vocab_size` (a teacher vocabulary padded beyond the
student's) are dropped from the top-k, so their mass lands in the tail bucket; the tail is then
the mass of every other token of the *teacher's* vocabulary. A position with fewer usable
entries than asked keeps what it has; `opd.teachers.served` cuts every row to the smallest
count (a valid top-k' + tail) and counts the short positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class MalformedResponse(ValueError):
    """A 2xx response whose body does not have the documented shape (retried, then reported)."""


@dataclass
class RowScores:
    """What a server said about the counted positions of one row.

    Attributes:
      token_logprobs: log p(ids[j]) for each requested position j.
      top_ids, top_logprobs: per requested position, the usable top entries, descending
        (at most k; fewer where the server gave fewer).
    """

    token_logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)


# ----------------------------------------------------------------------------- requests


def vllm_request(model: str, rows: list[list[int]], k: int, temperature: float) -> dict:
    """Body of `POST /v1/completions` scoring `rows` (token ids, never text)."""
    return {
        "model": model,
        "prompt": rows[0] if len(rows) == 1 else rows,
        "max_tokens": 1,
        "temperature": temperature,
        "prompt_logprobs": k,
    }


def sglang_request(rows: list[list[int]], k: int, temperature: float) -> dict:
    """Body of SGLang's `POST /generate` scoring `rows` (prefill only: max_new_tokens 0)."""
    body = {
        "input_ids": rows[0] if len(rows) == 1 else rows,
        "sampling_params": {"max_new_tokens": 0, "temperature": temperature},
        "return_logprob": True,
        "logprob_start_len": 0,
    }
    if k:
        body["top_logprobs_num"] = k
    return body


# ------------------------------------------------------------------------------ parsers


def _number(x, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise MalformedResponse(f"{where}: expected a number, got {x!r}"[:200])
    x = float(x)
    if math.isnan(x) or x > 1e-3:
        raise MalformedResponse(f"{where}: {x} is not a log-probability")
    return min(x, 0.0)


def vllm_top(entry: dict, realised: int, k: int, vocab_size: int, where: str):
    """The usable top-k of one vLLM prompt-logprob entry: (ids, logprobs), descending."""
    others, realised_rank, realised_lp = [], None, None
    for key, info in entry.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise MalformedResponse(f"{where}: token key {key!r} is not an id") from None
        if not isinstance(info, dict) or "logprob" not in info:
            raise MalformedResponse(f"{where}: entry of id {tid} has no 'logprob'")
        lp = _number(info["logprob"], f"{where} id {tid}")
        rank = info.get("rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
            raise MalformedResponse(f"{where}: rank of id {tid} is {rank!r}")
        if tid == realised:
            realised_rank, realised_lp = rank, lp
        else:
            others.append((rank, lp, tid))
    if realised_lp is None:
        raise MalformedResponse(f"{where}: the realised token {realised} has no entry")
    if any(r is None for r, _, _ in others) or realised_rank is None:
        # No ranks: order by log-prob; the realised token counts only if it is not the extra one.
        ranked = sorted(others, key=lambda e: -e[1])
        if len(ranked) < k:
            ranked = sorted(ranked + [(None, realised_lp, realised)], key=lambda e: -e[1])
        chain = [(lp, tid) for _, lp, tid in ranked]
    else:
        taken = {r for r, _, _ in others}
        ranked = others + (
            [(realised_rank, realised_lp, realised)] if realised_rank not in taken else []
        )
        ranked.sort(key=lambda e: (e[0], -e[1]))
        chain = []
        for rank, lp, tid in ranked:
            if rank != len(chain) + 1:
                break
            chain.append((lp, tid))
    chain = chain[:k]
    kept = [(lp, tid) for lp, tid in chain if 0 <= tid < vocab_size]
    return [t for _, t in kept], [lp for lp, _ in kept], realised_lp


def parse_vllm(
    body, rows: list[list[int]], positions: list[list[int]], k: int, vocab_size: int
) -> list[RowScores]:
    """Parse a `/v1/completions` response for `rows`, reading entries `positions[i]` of row i."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise MalformedResponse("no 'choices' list in the response")
    choices = body["choices"]
    if len(choices) != len(rows) or not all(isinstance(c, dict) for c in choices):
        raise MalformedResponse(f"{len(choices)} choices for {len(rows)} prompts")
    choices = sorted(choices, key=lambda c: c.get("index", 0))
    out = []
    for i, (choice, row, pos) in enumerate(zip(choices, rows, positions)):
        plp = choice.get("prompt_logprobs")
        if not isinstance(plp, list) or len(plp) != len(row):
            n = len(plp) if isinstance(plp, list) else plp
            raise MalformedResponse(
                f"choice {i}: prompt_logprobs {n!r} for {len(row)} tokens"[:200]
            )
        scores = RowScores()
        for j in pos:
            entry = plp[j]
            if not isinstance(entry, dict):
                raise MalformedResponse(f"choice {i} position {j}: entry is {entry!r}"[:200])
            ids, lps, tok_lp = vllm_top(entry, row[j], k, vocab_size, f"choice {i} position {j}")
            scores.token_logprobs.append(tok_lp)
            scores.top_ids.append(ids)
            scores.top_logprobs.append(lps)
        out.append(scores)
    return out


def _triple(x, where: str) -> tuple[float | None, int]:
    if not isinstance(x, (list, tuple)) or len(x) < 2 or not isinstance(x[1], int):
        raise MalformedResponse(f"{where}: expected [logprob, id, text], got {x!r}"[:200])
    return (None if x[0] is None else _number(x[0], where)), x[1]


def parse_sglang(
    body, rows: list[list[int]], positions: list[list[int]], k: int, vocab_size: int
) -> list[RowScores]:
    """Parse a `/generate` response (one object, or a list for a batch) for `rows`."""
    items = body if isinstance(body, list) else [body]
    if len(items) != len(rows):
        raise MalformedResponse(f"{len(items)} results for {len(rows)} inputs")
    out = []
    for i, (item, row, pos) in enumerate(zip(items, rows, positions)):
        meta = item.get("meta_info") if isinstance(item, dict) else None
        tokens = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
        if not isinstance(tokens, list) or len(tokens) not in (len(row), len(row) - 1):
            raise MalformedResponse(f"input {i}: no input_token_logprobs for {len(row)} tokens")
        shift = len(row) - len(tokens)  # 1 when the null first position is left out
        tops = meta.get("input_top_logprobs") if k else None
        if k and (not isinstance(tops, list) or len(tops) != len(tokens)):
            raise MalformedResponse(f"input {i}: input_top_logprobs does not match the input")
        scores = RowScores()
        for j in pos:
            where = f"input {i} position {j}"
            lp, tid = _triple(tokens[j - shift], where)
            if tid != row[j] or lp is None:
                raise MalformedResponse(f"{where}: got id {tid} / {lp}, sent id {row[j]}")
            entries = [_triple(e, where) for e in (tops[j - shift] or [])] if k else []
            entries = sorted(
                ((e_lp, e_id) for e_lp, e_id in entries if e_lp is not None), key=lambda e: -e[0]
            )[:k]
            kept = [(e_lp, e_id) for e_lp, e_id in entries if 0 <= e_id < vocab_size]
            scores.token_logprobs.append(lp)
            scores.top_ids.append([e_id for _, e_id in kept])
            scores.top_logprobs.append([e_lp for e_lp, _ in kept])
        out.append(scores)
    return out


PARSERS = {"vllm": parse_vllm, "opd": parse_vllm, "sglang": parse_sglang}


def server_message(body, text: str) -> str:
    """The error message of a 4xx/5xx body (vLLM, SGLang, FastAPI shapes), on one line."""
    msg = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            msg = err.get("message")
        elif isinstance(err, str):
            msg = err
        msg = msg or body.get("message") or body.get("detail")
    if msg is None:
        msg = text
    if not isinstance(msg, str):
        msg = str(msg)
    return " ".join(msg.split())[:300] or "(empty body)"
