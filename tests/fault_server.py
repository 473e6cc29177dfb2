"""An `opd serve-teacher` that misbehaves on purpose, for the served-teacher client's tests.

    python tests/fault_server.py MODEL --port 0 --port-file F [serve-teacher options]
        [--fail-first N] [--malformed-first N] [--delay-first N --delay S] [--exit-at N]

It builds opd's own app (`opd.serve.create_app`) and adds one middleware on
POST /v1/completions and /v1/chat/completions, counting those requests from 1:

- requests 1..N of --fail-first get HTTP 500 (a vLLM-style error body);
- the next --malformed-first requests get HTTP 200 with a body that is not valid JSON;
- requests 1..N of --delay-first wait --delay seconds before being handled (then fail,
  break or succeed as above);
- with --exit-at N the process ends at once (os._exit(3), no answer, no cleanup) when the
  N-th request arrives: a server killed mid-run.

Every other request is served normally. GET /fault/stats returns the counters. The start-up
handshake is the real server's: one stdout line once listening, PORT written to --port-file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from fastapi.responses import JSONResponse, Response

from opd.errors import OpdError
from opd.serve import ServeSettings, create_app, load_engine, run_app
from opd.serve.args import add_serve_arguments
from opd.serve.protocol import error_body
from opd.serve.server import bind_socket

FAULT_PATHS = ("/v1/completions", "/v1/chat/completions")
MALFORMED = b'{"id": "cmpl-broken", "object": "text_completion", "choices": [{"index": 0, '


def parse_args(argv):
    p = add_serve_arguments(argparse.ArgumentParser(prog="fault_server.py"))
    p.add_argument("--fail-first", type=int, default=0, metavar="N", help="HTTP 500 on 1..N")
    p.add_argument("--malformed-first", type=int, default=0, metavar="N", help="then bad JSON")
    p.add_argument("--delay-first", type=int, default=0, metavar="N", help="delay 1..N")
    p.add_argument("--delay", type=float, default=0.0, metavar="S", help="seconds of delay")
    p.add_argument("--exit-at", type=int, default=0, metavar="N", help="exit when N arrives")
    return p.parse_args(argv)


def add_faults(app, args) -> dict:
    """Install the fault middleware on `app`; returns its live counters."""
    counts = {"completions": 0, "failed": 0, "malformed": 0, "delayed": 0}

    @app.middleware("http")
    async def faults(request, call_next):
        if request.method != "POST" or request.url.path not in FAULT_PATHS:
            return await call_next(request)
        counts["completions"] += 1
        n = counts["completions"]
        if args.exit_at and n >= args.exit_at:
            os._exit(3)
        if n <= args.delay_first:
            counts["delayed"] += 1
            await asyncio.sleep(args.delay)
        if n <= args.fail_first:
            counts["failed"] += 1
            return JSONResponse(error_body(500, f"injected failure {n}"), 500)
        if n <= args.fail_first + args.malformed_first:
            counts["malformed"] += 1
            return Response(MALFORMED, media_type="application/json")
        return await call_next(request)

    @app.get("/fault/stats")
    async def fault_stats():
        return dict(counts)

    return counts


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        settings = ServeSettings.from_args(args)
        engine = load_engine(args)
        sock = bind_socket(args.host, args.port)
        app = create_app(engine, settings)
        add_faults(app, args)
        return run_app(app, sock, label=args.model, port_file=args.port_file)
    except OpdError as err:
        print(f"opd: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
