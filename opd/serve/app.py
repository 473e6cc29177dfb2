"""The FastAPI app of `opd serve-teacher`: routes, body limits, vLLM-style errors.

Routes: POST /v1/completions (prompt log-probs of token ids, `opd.serve.protocol`),
POST /v1/chat/completions (the model writes text, `opd.serve.chat`), GET /v1/models,
GET /health, POST /tokenize, GET /opd/tokenizer (fingerprint, see `opd.teachers.fingerprint`)
and GET /opd/stats (batcher counters). Bodies are read with a
byte cap derived from --max-request-tokens, so an oversized request is refused (413) before it
is parsed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from opd.serve.args import ServeSettings
from opd.serve.batcher import DynamicBatcher
from opd.serve.protocol import ApiError, completion_body, error_body, parse_completion
from opd.teachers.fingerprint import tokenizer_fingerprint

_BYTES_PER_TOKEN = 16  # "123456, " is 8 bytes; room for brackets and spacing
_BODY_SLACK = 1 << 16


async def _json_body(request: Request, limit: int):
    """The parsed JSON body; 413 past `limit` bytes, 400 when it is not JSON."""
    too_big = (
        f"the request body is over this server's limit of {limit} bytes (it follows "
        f"--max-request-tokens; restart the server with a larger value)"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, too_big)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None


def _json(payload) -> Response:
    return Response(json.dumps(payload, allow_nan=False), media_type="application/json")


def create_app(engine, settings: ServeSettings) -> FastAPI:
    """An app serving `engine` (`opd.serve.engine.TeacherEngine` or one with its attributes)."""
    body_limit = settings.max_request_tokens * _BYTES_PER_TOKEN + _BODY_SLACK
    fingerprint = tokenizer_fingerprint(engine.tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = DynamicBatcher(engine, settings.max_batch_tokens, settings.batch_wait_ms)
        batcher.start()
        app.state.batcher = batcher
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="opd serve-teacher", lifespan=lifespan, docs_url=None, redoc_url=None)

    if settings.api_key:
        expected = f"Bearer {settings.api_key}".encode()

        @app.middleware("http")
        async def bearer_token(request: Request, call_next):
            given = request.headers.get("authorization", "").encode()
            if request.url.path != "/health" and not hmac.compare_digest(given, expected):
                message = "missing or wrong API key (send `Authorization: Bearer KEY`)"
                return JSONResponse(error_body(401, message), 401)
            return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        batcher = getattr(request.app.state, "batcher", None)
        if batcher is not None:
            batcher.stats.rejected += 1
        return JSONResponse(error_body(err.status, err.message, err.param), err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return JSONResponse(error_body(err.status_code, str(err.detail)), err.status_code)

    def render(req, results) -> bytes:
        body = completion_body(
            req,
            results,
            request_id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            name=settings.name,
            decoded=engine.decoded,
        )
        try:
            return json.dumps(body, allow_nan=False).encode()
        except ValueError:
            raise ApiError(500, "the teacher produced non-finite log-probabilities") from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request, body_limit)
        req = parse_completion(body, settings, engine.vocab_size, engine.max_model_len)
        batcher: DynamicBatcher = request.app.state.batcher
        try:
            results = await batcher.submit(req.seqs, req.temperature, req.k or 0)
        except Exception as err:  # noqa: BLE001 - the client gets one line, the server survives
            raise ApiError(500, f"scoring failed: {type(err).__name__}: {err}") from None
        payload = await asyncio.to_thread(render, req, results)  # large bodies: off the loop
        batcher.stats.requests += 1
        return Response(payload, media_type="application/json")

    @app.get("/v1/models")
    async def models():
        card = {
            "id": settings.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "opd",
            "root": settings.name,
            "parent": None,
            "max_model_len": engine.max_model_len,
            "max_logprobs": settings.max_logprobs,
            "vocab_size": engine.vocab_size,
        }
        return _json({"object": "list", "data": [card]})

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/opd/tokenizer")
    async def tokenizer_info():
        return _json(
            {
                "fingerprint": fingerprint,
                "vocab_size": len(engine.tokenizer),
                "name": settings.name,
            }
        )

    @app.get("/opd/stats")
    async def stats(request: Request):
        batcher: DynamicBatcher = request.app.state.batcher
        return _json(batcher.stats.as_dict(batcher.queued))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _json_body(request, body_limit)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise ApiError(400, "`prompt` must be a string (chat messages are not supported)")
        model = body.get("model")
        if model is not None and model != settings.name:
            raise ApiError(404, f"The model `{model}` does not exist", "model")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise ApiError(400, f"add_special_tokens={special!r}: must be true or false")
        ids = engine.tokenizer(body["prompt"], add_special_tokens=special)["input_ids"]
        return _json({"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len})

    from opd.serve.chat import add_chat_route  # POST /v1/chat/completions: the model writes

    add_chat_route(app, engine, settings, _json_body, body_limit, _json)
    return app
