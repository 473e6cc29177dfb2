"""`opd serve-teacher`: a teacher behind HTTP, speaking the prompt-logprobs subset of vLLM's
OpenAI-compatible API (docs/serve.md).

For token ids x_0..x_{L-1} and temperature τ the server returns, at each position j ≥ 1, the
top-k of p_j = softmax(z_{j-1} / τ) plus the realised token x_j with its log-probability and
rank (vLLM's ``--logprobs-mode processed_logprobs``). An ensemble serves the mixture
p = Σ_k w_k p_k, i.e. log p = logsumexp_k(log w_k + log_softmax(z_k / τ)).

Modules: `args` (command-line options), `engine` (one padded forward, chunked top-k),
`batcher` (dynamic batching of concurrent requests), `protocol` (request checks, response
bodies, vLLM-style errors), `app` (FastAPI routes), `server` (bind, uvicorn, port file).
FastAPI and uvicorn are imported only when a server is built (`pip install opd[serve]`).
"""

from __future__ import annotations

__all__ = ["ServeSettings", "create_app", "load_engine", "run_app", "serve_teacher"]


def __getattr__(name: str):
    if name == "create_app":
        from opd.serve.app import create_app

        return create_app
    if name == "ServeSettings":
        from opd.serve.args import ServeSettings

        return ServeSettings
    if name in ("load_engine", "run_app", "serve_teacher"):
        from opd.serve import server

        return getattr(server, name)
    raise AttributeError(f"module 'opd.serve' has no attribute {name!r}")
