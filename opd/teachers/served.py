"""A teacher served over HTTP (vLLM, SGLang or `opd serve-teacher`): top-k and token log-probs.

`ServedTeacher.logprobs(rollout, k, τ, V)` sends each rollout row's token ids (prompt +
completion, padding dropped, cut after the last counted token; never re-tokenised text) as a
prompt and reads the server's prompt log-probs. Completion token t of row b sits at unpadded
index j = p_b + t (p_b = the row's real prompt tokens) and its score is entry j, the teacher's
p(· | ids[:j]) at temperature τ. It returns, for the N counted tokens in row-major order (as
`opd.teachers.topk.completion_targets`):

    token_logprobs_N  (N,)         log p_τ(y_t), always
    topk_ids_NK       (N, k' + 1)  the k' best ids, descending, then TAIL_ID   (k ≥ 1 only)
    topk_logprobs_NK  (N, k' + 1)  their log-probs, then log(1 − Σ p) (`with_tail`)

so the scores are interchangeable with `TopK` / `SampledLogprobs` on a local teacher. k' = k
unless the server gave fewer usable entries somewhere: then k' is the smallest count over the
rollout (a valid top-k' + tail, never an invented id) and those positions are counted in
`teacher_topk_short`. Ids ≥ V are left out of the top-k (their mass lands in the tail).

Rows are packed into requests of at most `batch_tokens` tokens, `concurrency` in flight
(`opd.teachers.http`, which also retries and counts). Deviation from a local teacher: the
scores are float32 on the CPU, whatever the server computed in.

Temperature: not every server applies the request's τ to prompt log-probs (SGLang's input
log-probs ignore it; vLLM's depend on its version and `--logprobs-mode`). The first call at
τ ≠ 1 therefore re-scores its first request at τ = 1 and refuses a server whose answers do not
change. Before training, `check_tokenizer` and `check_k` refuse a mismatched tokenizer and a k
above the server's cap.
"""

from __future__ import annotations

import os
import time
from functools import partial
from urllib.parse import urlsplit, urlunsplit

import torch

from opd.errors import ConfigError, DataError
from opd.teachers import wire
from opd.teachers.http import TeacherRejected, TeacherUnreachable, Transport
from opd.teachers.served_checks import ServedChecks
from opd.teachers.topk import TAIL_ID, with_tail
from opd.types import Rollout, TeacherScores

__all__ = [
    "APIS",
    "ServedTeacher",
    "TeacherRejected",
    "TeacherUnreachable",
    "client_transport",
]

APIS = ("vllm", "sglang", "opd")
PATHS = {"vllm": "/v1/completions", "opd": "/v1/completions", "sglang": "/generate"}


def _display_url(url: str) -> str:
    """The URL without user:password@ (never shown)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, ""))


def client_transport(
    url: str,
    *,
    concurrency: int = 4,
    timeout_s: float = 60.0,
    retries: int = 4,
    backoff_s: float = 0.5,
    token_env: str | None = None,
    transport=None,
    sleep=time.sleep,
) -> Transport:
    """The checked `Transport` to a teacher at `url` (shared by `ServedTeacher` and
    `opd.teachers.chat.ChatTeacher`): the URL, the client settings and the bearer token read
    from the environment variable `token_env` are validated; `Transport.url` is the URL
    without user:password@, the only form ever shown."""
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(f"model.teacher: {url!r} is not an http:// or https:// URL")
    if not urlsplit(url).hostname:
        raise ConfigError(f"model.teacher: {url!r} names no host")
    for name, value, low in (("concurrency", concurrency, 1), ("retries", retries, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"teacher {name}: {value!r} must be an integer >= {low}")
    if not timeout_s > 0 or not backoff_s >= 0:
        raise ConfigError(
            f"teacher timeout_s ({timeout_s}) must be > 0 and backoff_s ({backoff_s}) >= 0"
        )
    token = None
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            raise ConfigError(
                f"model.teacher_token_env: environment variable {token_env} is not set "
                "(it should hold the served teacher's bearer token)"
            )
    client = Transport(
        url.rstrip("/"),
        concurrency=concurrency,
        timeout_s=timeout_s,
        retries=retries,
        backoff_s=backoff_s,
        token=token,
        transport=transport,
        sleep=sleep,
    )
    client.url = _display_url(url.rstrip("/"))
    return client


class ServedTeacher(ServedChecks):
    """A teacher behind an HTTP endpoint; see the module docstring."""

    provides = frozenset({"topk_logprobs", "token_logprobs"})

    def __init__(
        self,
        url: str,
        *,
        api: str = "auto",
        model: str | None = None,
        concurrency: int = 4,
        batch_tokens: int = 16384,
        timeout_s: float = 60.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        token_env: str | None = None,
        transport=None,
        sleep=time.sleep,
    ):
        if api == "openai-chat":  # [black-box] text only: another client
            raise ConfigError(
                "model.teacher_api: 'openai-chat' is a text teacher, not a log-prob server; "
                "build it with opd.teachers.chat.ChatTeacher"
            )
        if api not in ("auto", *APIS):
            raise ConfigError(f"model.teacher_api: {api!r} is not one of auto, {', '.join(APIS)}")
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ConfigError(f"teacher batch_tokens: {batch_tokens!r} must be an integer >= 1")
        self.transport = client_transport(
            url,
            concurrency=concurrency,
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            token_env=token_env,
            transport=transport,
            sleep=sleep,
        )
        self.url = self.transport.url
        self.batch_tokens = batch_tokens
        self._api = None if api == "auto" else api
        self._model = model
        self._models_entry: dict | None = None
        self._temperature_ok: set[float] = set()

    # ------------------------------------------------------------------ identity

    @property
    def api(self) -> str:
        """The server's API (detected on first use when constructed with api="auto")."""
        if self._api is None:
            self._api = self._detect()
        return self._api

    def _detect(self) -> str:
        entry = self._first_model(missing_ok=True)
        owner = entry.get("owned_by") if entry else None
        if owner in ("opd", "vllm"):
            return owner
        if self.transport.call("GET", "/get_model_info", missing_ok=True) is not None:
            return "sglang"
        seen = f"GET /v1/models owned_by={owner!r}" if entry else "no GET /v1/models"
        raise ConfigError(
            f"cannot tell which API the teacher at {self.url} speaks ({seen}, no GET "
            "/get_model_info); set model.teacher_api=vllm, sglang or opd"
        )

    def _first_model(self, missing_ok: bool = False) -> dict | None:
        """`data[0]` of GET /v1/models (cached)."""
        if self._models_entry is None:

            def first(body):
                data = body.get("data") if isinstance(body, dict) else None
                if not isinstance(data, list) or not data or not isinstance(data[0], dict):
                    raise wire.MalformedResponse("GET /v1/models has no 'data' list")
                return data[0]

            self._models_entry = self.transport.call(
                "GET", "/v1/models", parse=first, missing_ok=missing_ok
            )
        return self._models_entry

    @property
    def model_name(self) -> str:
        if self._model is None:
            entry = self._first_model()
            if not isinstance(entry.get("id"), str):
                raise ConfigError(
                    f"teacher {self.url}: GET /v1/models names no model id; set model.teacher_model"
                )
            self._model = entry["id"]
        return self._model

    def describe(self) -> str:
        api = self._api or "API detected on first use"
        return f"served teacher {self.url} ({api}{' API' if self._api else ''})"

    # ------------------------------------------------------------------ scoring

    def logprobs(
        self, rollout: Rollout, k: int, temperature: float, vocab_size: int
    ) -> TeacherScores:
        """Scores of the rollout's N counted tokens; see the module docstring."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"served teacher: k must be an integer >= 0, got {k!r}")
        if k > vocab_size:
            raise ConfigError(f"served teacher: k = {k} exceeds the vocabulary V = {vocab_size}")
        if not temperature > 0:
            raise ConfigError(f"served teacher: temperature must be > 0, got {temperature}")
        start = time.perf_counter()
        try:
            rows, positions = self._rows(rollout)
            batches = self._batches(rows)
            results = self._score(batches, rows, positions, k, temperature, vocab_size)
            if temperature != 1.0 and temperature not in self._temperature_ok and batches:
                self._check_temperature(batches[0], rows, positions, results, temperature)
        finally:
            self.transport.count("teacher_seconds", time.perf_counter() - start)
        return self._assemble(results, k)

    def _rows(self, rollout: Rollout) -> tuple[list[list[int]], list[list[int]]]:
        """Per row with counted tokens: the ids to send, and the entries to read."""
        P = rollout.prompt_len
        ids_BL = rollout.input_ids_BL.detach().cpu()
        mask_BL = rollout.attention_mask_BL.detach().cpu().bool()
        counted_BT = rollout.completion_mask_BT.detach().cpu().bool()
        rows, positions = [], []
        for b in range(ids_BL.shape[0]):
            cols = counted_BT[b].nonzero()[:, 0] + P
            if not len(cols):
                continue
            if not mask_BL[b, cols].all():
                raise ValueError(f"row {b}: a counted completion token is masked out")
            index_L = mask_BL[b].long().cumsum(0) - 1  # unpadded index of each column
            pos = index_L[cols].tolist()
            if pos[0] < 1:
                raise DataError(
                    f"rollout row {b}: a counted token is the row's first token (empty prompt); "
                    "a served teacher has no context to score it"
                )
            rows.append(ids_BL[b][mask_BL[b]][: pos[-1] + 1].tolist())
            positions.append(pos)
        return rows, positions

    def _batches(self, rows: list[list[int]]) -> list[list[int]]:
        """Row indices grouped into requests of at most `batch_tokens` tokens (in order)."""
        batches, current, size = [], [], 0
        for i, row in enumerate(rows):
            if current and size + len(row) > self.batch_tokens:
                batches.append(current)
                current, size = [], 0
            current.append(i)
            size += len(row)
        return batches + ([current] if current else [])

    def _request(self, batch, rows, positions, k, temperature, vocab_size):
        api = self.api
        sent = [rows[i] for i in batch]
        if api == "sglang":
            body = wire.sglang_request(sent, k, temperature)
        else:
            body = wire.vllm_request(self.model_name, sent, k, temperature)
        parse = partial(
            wire.PARSERS[api],
            rows=sent,
            positions=[positions[i] for i in batch],
            k=k,
            vocab_size=vocab_size,
        )
        return body, parse

    def _score(self, batches, rows, positions, k, temperature, vocab_size) -> list:
        """RowScores of every row, in row order."""
        requests = [self._request(b, rows, positions, k, temperature, vocab_size) for b in batches]
        answers = self.transport.map(
            PATHS[self.api], [body for body, _ in requests], [parse for _, parse in requests]
        )
        return [row for answer in answers for row in answer]

    def _assemble(self, results: list, k: int) -> TeacherScores:
        token_N = torch.tensor(
            [lp for r in results for lp in r.token_logprobs], dtype=torch.float32
        )
        if not k:
            return TeacherScores(token_logprobs_N=token_N)
        counts = [len(ids) for r in results for ids in r.top_ids]
        short = sum(c < k for c in counts)
        if short:
            self.transport.count("teacher_topk_short", short)
        kk = min(counts, default=k)
        ids_NK = torch.tensor(
            [ids[:kk] for r in results for ids in r.top_ids], dtype=torch.int64
        ).reshape(-1, kk)
        lps_NK = torch.tensor(
            [lps[:kk] for r in results for lps in r.top_logprobs], dtype=torch.float32
        ).reshape(-1, kk)
        tail_N1 = torch.full((ids_NK.shape[0], 1), TAIL_ID, dtype=torch.int64)
        return TeacherScores(
            topk_ids_NK=torch.cat([ids_NK, tail_N1], dim=1),
            topk_logprobs_NK=with_tail(lps_NK),
            token_logprobs_N=token_N,
        )

    def _check_temperature(self, batch, rows, positions, results, temperature) -> None:
        """Refuse a server that gives the same log-probs at τ as at 1 (it ignores τ)."""
        body, parse = self._request(batch, rows, positions, 0, 1.0, 1 << 62)
        plain = [
            lp
            for r in self.transport.call("POST", PATHS[self.api], body, parse)
            for lp in r.token_logprobs
        ]
        scaled = [lp for r in results[: len(batch)] for lp in r.token_logprobs]
        if not any(abs(lp) > 1e-3 for lp in plain):
            return  # every token certain at τ = 1: nothing to tell the temperatures apart
        if max(abs(a - b) for a, b in zip(plain, scaled)) > 1e-6:
            self._temperature_ok.add(temperature)
            return
        how = {
            "vllm": "start vLLM with --logprobs-mode processed_logprobs (or use temperature 1)",
            "sglang": "SGLang's input log-probs ignore the temperature; use temperature 1 "
            "(e.g. signal temperature 1) or a vLLM / opd server",
            "opd": "update the server (opd serve-teacher applies the temperature)",
        }[self.api]
        raise ConfigError(
            f"teacher {self.url} returns the same log-probs at temperature {temperature} as "
            f"at 1: it does not apply the temperature to prompt log-probs; {how}"
        )

    # ------------------------------------------------------------------ bookkeeping

    def pop_stats(self) -> dict:
        """Counters since the last call (see `opd.teachers.http.COUNTERS`)."""
        return self.transport.pop_stats()

    def close(self) -> None:
        self.transport.close()
