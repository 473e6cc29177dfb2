"""The options of `opd serve-teacher` (kept light: `opd.cli` imports this for every command)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

DEFAULT_HOST = "127.0.0.1"


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _port(text: str) -> int:
    value = _int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(
            f"must be in [0, 65535] (0 picks a free port), got {value}"
        )
    return value


def _wait_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds, got {text!r}") from None
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be in [0, 10000] ms, got {value}")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `opd serve-teacher`'s positional MODEL and its options to `p`."""
    p.description = (
        "Serve a teacher over HTTP: the vLLM-compatible prompt-logprobs subset of "
        "POST /v1/completions (token ids in, per-position top-k log-probs out), plus "
        "/v1/models, /health, /tokenize, /opd/tokenizer and /opd/stats (docs/serve.md)."
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a Hugging Face folder, a .gguf file, 'embedded', or a comma list (an ensemble, "
        "p = Σ w_k p_k)",
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to bind (default 127.0.0.1; any other address only when given here)",
    )
    p.add_argument("--port", type=_port, default=8000, help="port (0: a free one; default 8000)")
    p.add_argument("--port-file", metavar="PATH", help="write the port here once listening")
    p.add_argument(
        "--name", help="the model name clients send and /v1/models lists (default MODEL)"
    )
    p.add_argument(
        "--max-logprobs",
        metavar="K",
        type=_int_at_least(0),
        default=20,
        help="largest prompt_logprobs k a request may ask for (default 20)",
    )
    p.add_argument(
        "--max-batch-tokens",
        metavar="N",
        type=_int_at_least(1),
        default=16384,
        help="padded tokens per forward pass of the dynamic batcher (default 16384)",
    )
    p.add_argument(
        "--batch-wait-ms",
        metavar="MS",
        type=_wait_ms,
        default=2.0,
        help="how long the batcher waits for more requests before a forward (default 2)",
    )
    p.add_argument(
        "--max-request-tokens",
        metavar="N",
        type=_int_at_least(1),
        default=32768,
        help="largest number of prompt tokens in one request; larger ones get 413 (default 32768)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:i (default auto)")
    p.add_argument(
        "--weights",
        default="",
        metavar="W1,W2",
        help="ensemble weights, one per MODEL entry, e.g. 0.5,0.5",
    )
    p.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require `Authorization: Bearer KEY` (all but /health), KEY read from this "
        "environment variable",
    )
    p.add_argument("--threads", type=_int_at_least(1), metavar="N", help="CPU threads for torch")
    return p


@dataclass(frozen=True)
class ServeSettings:
    """What the app needs to know besides the engine (limits and the served name)."""

    name: str
    max_logprobs: int = 20
    max_batch_tokens: int = 16384
    batch_wait_ms: float = 2.0
    max_request_tokens: int = 32768
    api_key: str | None = field(default=None, repr=False)  # never printed or logged

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeSettings:
        """Settings from parsed options; the API key is read from --api-key-env's variable."""
        from opd.errors import ConfigError

        key = None
        if args.api_key_env:
            key = os.environ.get(args.api_key_env, "")
            if not key.strip():
                raise ConfigError(
                    f"--api-key-env {args.api_key_env}: that environment variable is not set "
                    f"or empty"
                )
        return cls(
            name=args.name or args.model,
            max_logprobs=args.max_logprobs,
            max_batch_tokens=args.max_batch_tokens,
            batch_wait_ms=args.batch_wait_ms,
            max_request_tokens=args.max_request_tokens,
            api_key=key.strip() if key else None,
        )
