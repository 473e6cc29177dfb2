"""The transport to a served teacher: one `httpx.Client`, parallel requests, retries, counters.

Every request goes through `Transport.call`, which tries up to `retries + 1` times:

    timeout                    -> counted in teacher_timeouts, retried
    connection error, HTTP 5xx -> counted in teacher_errors, retried
    2xx with a malformed body  -> (invalid JSON, or a shape the parser refuses) counted in
                                  teacher_errors, retried
    HTTP 4xx                   -> not retried: `TeacherRejected` with the server's message
    budget spent               -> `TeacherUnreachable`, one line naming the URL and the last
                                  failure

Before try i (i ≥ 1) it sleeps backoff_s · 2^(i−1), capped at `MAX_BACKOFF_S`. `Transport.map`
sends many bodies with at most `concurrency` in flight (a thread pool; httpx's client is
thread-safe) and returns the parsed results in the order of the bodies. The bearer token, if
any, is sent in the Authorization header and scrubbed from every message this module writes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from opd.errors import ConfigError, TeacherUnreachable  # noqa: F401 - re-exported
from opd.teachers.wire import server_message

MAX_BACKOFF_S = 30.0
"""Longest sleep between two tries."""

COUNTERS = (
    "teacher_requests",
    "teacher_retries",
    "teacher_timeouts",
    "teacher_errors",
    "teacher_seconds",
    "teacher_topk_short",
)


class TeacherRejected(ConfigError):
    """The served teacher refused a request (HTTP 4xx): retrying the same request cannot help."""

    def __init__(self, message: str, status: int, server_text: str):
        super().__init__(message)
        self.status = status
        self.server_text = server_text


class Transport:
    """HTTP to one served teacher, with retries, counters and bounded parallelism."""

    def __init__(
        self,
        url: str,
        *,
        concurrency: int = 4,
        timeout_s: float = 60.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.url = url
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._secret = token
        self._sleep = sleep
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(
            base_url=url,
            headers=headers,
            timeout=timeout_s,
            transport=transport,
            limits=httpx.Limits(max_connections=concurrency + 2),
        )
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(COUNTERS, 0)

    # ------------------------------------------------------------------ counters

    def count(self, name: str, amount=1) -> None:
        with self._lock:
            self._stats[name] += amount

    def pop_stats(self) -> dict:
        with self._lock:
            stats, self._stats = self._stats, dict.fromkeys(COUNTERS, 0)
        stats["teacher_seconds"] = float(stats["teacher_seconds"])
        return stats

    # ------------------------------------------------------------------ requests

    def redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def call(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        parse: Callable = lambda data: data,
        missing_ok: bool = False,
    ):
        """`parse(json)` of the answer to one request, retried as the module docstring says.

        With `missing_ok`, a 404 / 405 answer returns None instead of raising (probing which
        API a server speaks).
        """
        last = "no try made"
        for attempt in range(self.retries + 1):
            if attempt:
                self.count("teacher_retries")
                self._sleep(min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
            self.count("teacher_requests")
            try:
                resp = self._client.request(method, path, json=body)
            except httpx.TimeoutException:
                self.count("teacher_timeouts")
                last = f"{method} {path} timed out after {self.timeout_s:g} s"
                continue
            except httpx.TransportError as exc:
                self.count("teacher_errors")
                last = f"{method} {path}: {_transport_failure(exc)}"
                continue
            if missing_ok and resp.status_code in (404, 405):
                return None
            if resp.status_code >= 400:
                self.count("teacher_errors")
                message = self.redact(server_message(_json_or_none(resp), resp.text))
                if resp.status_code >= 500:
                    last = f"{method} {path}: HTTP {resp.status_code}: {message}"
                    continue
                raise TeacherRejected(
                    self._rejected(method, path, resp.status_code, message),
                    resp.status_code,
                    message,
                )
            try:
                return parse(resp.json())
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
                # json.JSONDecodeError and wire.MalformedResponse are ValueErrors
                self.count("teacher_errors")
                reason = "invalid JSON" if _is_json_error(exc) else str(exc)
                last = f"{method} {path}: malformed response ({self.redact(reason)[:200]})"
        tries = self.retries + 1
        raise TeacherUnreachable(
            f"teacher {self.url} unreachable after {tries} {'try' if tries == 1 else 'tries'}: "
            f"{last}"
        )

    def map(self, path: str, bodies: list[dict], parses: list[Callable]) -> list:
        """`call("POST", path, body, parse)` for each body, `concurrency` at a time, in order."""
        if len(bodies) <= 1 or self.concurrency <= 1:
            return [self.call("POST", path, b, p) for b, p in zip(bodies, parses)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="opd-teacher")
        futures = [self._pool.submit(self.call, "POST", path, b, p) for b, p in zip(bodies, parses)]
        return [f.result() for f in futures]

    def _rejected(self, method: str, path: str, status: int, message: str) -> str:
        hint = ""
        if status in (401, 403):
            hint = " (check the bearer token: model.teacher_token_env)"
        return f"teacher {self.url} rejected {method} {path} (HTTP {status}): {message}{hint}"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._client.close()


def _json_or_none(resp: httpx.Response):
    try:
        return resp.json()
    except ValueError:
        return None


def _is_json_error(exc: Exception) -> bool:
    return isinstance(exc, json.JSONDecodeError)


def _transport_failure(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        low = text.lower()
        if "refused" in low:
            return f"connection refused ({text})"
        return f"cannot connect ({text})"
    return f"{type(exc).__name__}: {text}"
