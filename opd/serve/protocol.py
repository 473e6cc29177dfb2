"""Request checks and response bodies of the vLLM-compatible subset `opd serve-teacher` speaks.

A completion request scores token ids: `prompt` is one list of ids or a list of them,
`max_tokens` is 0 or 1, `prompt_logprobs` is k in [0, --max-logprobs], `temperature` τ > 0.
The response is vLLM's: `choices[i].prompt_logprobs` is a list with one entry per prompt
token, the first `null`, entry j a dict {"<id>": {"logprob", "rank", "decoded_token"}} with the
top-k of softmax(z_{j-1}/τ) (ranks 1..k) plus the realised token x_j with its true rank when
it is not among them. Errors are vLLM's error object with the HTTP status as `code`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from opd.serve.args import ServeSettings

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "UnauthorizedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ApiError(Exception):
    """A request the server refuses: HTTP `status` and a one-line message."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {
        "object": "error",
        "message": message,
        "type": _ERROR_TYPES.get(status, "BadRequestError"),
        "param": param,
        "code": status,
    }


@dataclass(frozen=True)
class CompletionRequest:
    seqs: list[list[int]]
    k: int | None  # prompt_logprobs; None: not asked (the choice's prompt_logprobs is null)
    temperature: float
    max_tokens: int

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _prompt_seqs(prompt) -> list[list[int]]:
    text = "send token ids: `prompt` must be a list of token ids or a list of such lists"
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)
    ):
        raise ApiError(400, f"{text}; text prompts are not supported (POST /tokenize)", "prompt")
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, f"{text}, got {type(prompt).__name__}", "prompt")
    seqs = [prompt] if all(_is_int(x) for x in prompt) else prompt
    for i, seq in enumerate(seqs):
        if not isinstance(seq, list) or not seq or not all(_is_int(x) for x in seq):
            raise ApiError(400, f"{text}; sequence {i} is not a non-empty list of ints", "prompt")
    return seqs


def _number(body: dict, key: str, default):
    value = body.get(key, default)
    return default if value is None else value


def parse_completion(body, settings: ServeSettings, vocab_size: int, max_model_len: int):
    """Check a /v1/completions body; ApiError names the field (and the flag that limits it)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != settings.name:
        raise ApiError(
            404,
            f"The model `{model}` does not exist; this server serves `{settings.name}`",
            "model",
        )
    for key, ok, why in (
        ("stream", lambda v: not v, "streaming is not supported"),
        ("n", lambda v: v in (None, 1), "only n=1 is supported"),
        ("echo", lambda v: not v, "echo is not supported"),
        ("logprobs", lambda v: v is None, "use prompt_logprobs (sampled logprobs not supported)"),
    ):
        if not ok(body.get(key)):
            raise ApiError(400, f"{key}={body.get(key)!r}: {why}", key)
    if "prompt" not in body:
        raise ApiError(400, "missing `prompt` (a list of token ids)", "prompt")
    seqs = _prompt_seqs(body["prompt"])
    total = sum(len(s) for s in seqs)
    if total > settings.max_request_tokens:
        raise ApiError(
            413,
            f"the request holds {total} prompt tokens, over this server's limit of "
            f"{settings.max_request_tokens} (restart it with a larger --max-request-tokens, "
            f"or send fewer sequences per request)",
            "prompt",
        )
    for i, seq in enumerate(seqs):
        if len(seq) > max_model_len:
            raise ApiError(
                400, f"sequence {i} has {len(seq)} tokens, over max_model_len={max_model_len}"
            )
        low, high = min(seq), max(seq)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ApiError(
                400, f"sequence {i}: token id {bad} is outside [0, {vocab_size})", "prompt"
            )
    max_tokens = _number(body, "max_tokens", 1)
    if not _is_int(max_tokens) or max_tokens not in (0, 1):
        raise ApiError(400, f"max_tokens={max_tokens!r}: only 0 or 1 is supported", "max_tokens")
    temperature = _number(body, "temperature", 1.0)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ApiError(400, f"temperature={temperature!r}: must be a number > 0", "temperature")
    k = body.get("prompt_logprobs")
    if k is not None:
        if not _is_int(k) or k < 0:
            raise ApiError(
                400, f"prompt_logprobs={k!r}: must be a whole number >= 0", "prompt_logprobs"
            )
        limit = min(settings.max_logprobs, vocab_size)
        if k > limit:
            raise ApiError(
                400,
                f"prompt_logprobs={k} is above this server's limit of {limit} "
                f"(restart it with --max-logprobs {k} or more)",
                "prompt_logprobs",
            )
    return CompletionRequest(seqs, k, float(temperature), max_tokens)


def _position_entries(scores, k: int, decoded: list[str], targets) -> list:
    """prompt_logprobs of one sequence: [None, {id: {...}}, ...] (vLLM's layout)."""
    top_ids = scores.top_ids[:, :k].tolist()
    top_lp = scores.top_logprobs[:, :k].tolist()
    tok_lp = scores.token_logprobs.tolist()
    tok_rank = scores.token_ranks.tolist()
    entries: list = [None]
    for j, target in enumerate(targets):
        entry = {
            str(i): {"logprob": lp, "rank": r + 1, "decoded_token": decoded[i]}
            for r, (i, lp) in enumerate(zip(top_ids[j], top_lp[j]))
        }
        if str(target) not in entry:
            entry[str(target)] = {
                "logprob": tok_lp[j],
                "rank": tok_rank[j],
                "decoded_token": decoded[target],
            }
        entries.append(entry)
    return entries


def completion_body(req: CompletionRequest, results, *, request_id, created, name, decoded):
    """The /v1/completions response body for `req` and the engine's per-sequence `results`."""
    choices = []
    for i, (seq, scores) in enumerate(zip(req.seqs, results)):
        choices.append(
            {
                "index": i,
                "text": decoded[scores.next_id] if req.max_tokens == 1 else "",
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": None
                if req.k is None
                else _position_entries(scores, req.k, decoded, seq[1:]),
            }
        )
    completion = req.max_tokens * len(req.seqs)
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": name,
        "choices": choices,
        "usage": {
            "prompt_tokens": req.tokens,
            "completion_tokens": completion,
            "total_tokens": req.tokens + completion,
        },
    }
