"""`opd serve-teacher`: bind, load the teacher(s), serve with uvicorn, announce the port.

The socket is bound here (so `--port 0` can report the port the OS picked and a busy port is
a one-line error); once uvicorn is accepting connections the server prints one line,
`opd serve-teacher: serving MODEL on http://HOST:PORT`, and writes PORT to --port-file
(atomically: a reader never sees a half-written file).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
from pathlib import Path

from opd.errors import ConfigError, OpdError
from opd.serve.args import ServeSettings


def _check_weights(text: str, count: int) -> list[float] | None:
    if not text:
        return None
    if count == 1:
        raise ConfigError("--weights: set, but MODEL names only one model (give a comma list)")
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights: expected comma-separated numbers, got {text!r}") from None
    if len(weights) != count:
        raise ConfigError(f"--weights: {len(weights)} weights for the {count} models of MODEL")
    return weights


def load_engine(args):
    """A `TeacherEngine` for the parsed `serve-teacher` arguments (errors are OpdError)."""
    import torch

    from opd.build import DTYPES, resolve_device
    from opd.serve.engine import TeacherEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [x.strip() for x in args.model.split(",") if x.strip()]
    if not specs:
        raise ConfigError("MODEL: empty; give 'embedded', a folder, a .gguf file or a comma list")
    weights = _check_weights(args.weights, len(specs))
    try:
        device = resolve_device(args.device)
    except ConfigError as err:  # the message names the config key; here it is the flag
        raise ConfigError(str(err).replace("model.device", "--device")) from None
    return TeacherEngine.load(specs, dtype=DTYPES[args.dtype], device=device, weights=weights)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ConfigError(f"--host {host}: cannot resolve it ({err.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"--host {host} --port {port}: cannot bind ({err.strerror}); "
            f"pick another port or --port 0 for a free one"
        ) from None
    sock.set_inheritable(True)
    return sock


def run_app(app, sock: socket.socket, *, label: str, port_file: str | None = None) -> int:
    """Serve `app` on the bound `sock` until SIGINT/SIGTERM; announce once listening."""
    import uvicorn

    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host

    async def announce():
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.01)
        if port_file:
            from opd.config_io import atomic_write_text

            atomic_write_text(Path(port_file), f"{port}\n")
        print(f"opd serve-teacher: serving {label} on http://{url_host}:{port}", flush=True)

    async def main():
        task = asyncio.create_task(announce())
        try:
            await server.serve(sockets=[sock])
        finally:
            task.cancel()

    try:
        asyncio.run(main())
    except SystemExit as stop:  # uvicorn exits this way when the app's startup fails
        raise OpdError(f"the server failed to start (exit code {stop.code})") from None
    finally:
        sock.close()
    return 0


def serve_teacher(args) -> int:
    """The `opd serve-teacher` command (arguments from `opd.serve.args`)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"opd serve-teacher needs FastAPI and uvicorn ({err}); pip install 'opd[serve]'"
        ) from None
    if args.port_file and not Path(args.port_file).parent.is_dir():
        raise ConfigError(f"--port-file {args.port_file}: its folder does not exist")
    settings = ServeSettings.from_args(args)
    sock = bind_socket(args.host, args.port)  # before the (slow) load: a busy port fails fast
    try:
        engine = load_engine(args)
    except BaseException:
        sock.close()
        raise
    if not _is_loopback(args.host) and not settings.api_key:
        print(
            f"opd serve-teacher: warning: listening on {args.host}, reachable from other "
            f"machines, without authentication (see --api-key-env)",
            file=sys.stderr,
        )
    from opd.serve.app import create_app

    app = create_app(engine, settings)
    return run_app(app, sock, label=args.model, port_file=args.port_file)
