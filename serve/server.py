"""`llmc serve`: uvicorn running the API (`api.create_app`) while the model loads beside it.

The server listens at once and answers /health with 503 until the artifact is loaded and the
engine started; an artifact that fails to load stops the server with the loader's error (exit
status 2). SIGTERM or Ctrl-C: uvicorn stops taking connections and gives running requests
`grace` seconds, then the engine finishes or aborts what is left; the process exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass

from ..runtime.errors import LlmcError

log = logging.getLogger(__name__)


@dataclass
class Options:
    artifact: str
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    prefill_chunk: int = 16
    kv_blocks: int | None = None
    prefix_cache: bool = True
    api_key: str | None = None
    threads: int | None = None
    grace: float = 30.0


def serve(options: Options) -> None:
    try:
        import uvicorn

        from .api import State, create_app
    except ImportError as e:
        raise LlmcError(f"llmc serve needs the serve extra (pip install 'llmc[serve]'): {e}") from None
    from pathlib import Path

    name = options.model_name or Path(options.artifact).name.removesuffix(".llmc")
    state = State(model_name=name, api_key=options.api_key, grace=options.grace)
    app = create_app(state)
    server = _server_class(uvicorn)(uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                                           timeout_graceful_shutdown=max(1, int(options.grace)), lifespan="on"))
    failure: list[LlmcError] = []

    def load():
        from .. import runtime
        from .engine import Engine

        try:
            model = runtime.load(options.artifact, threads=options.threads)
            state.engine = Engine(model, max_batch=options.max_batch, max_queue=options.max_queue,
                                  prefill_chunk=options.prefill_chunk, kv_blocks=options.kv_blocks,
                                  prefix_cache=options.prefix_cache, metrics=app.state.metrics)
            log.warning("serving %s as %r on http://%s:%d (batch %d, %s KV cache)", options.artifact, name,
                        options.host, options.port, state.engine.max_batch,
                        "paged" if state.engine.paged else "contiguous")
        except LlmcError as e:
            failure.append(e)
            server.should_exit = True

    threading.Thread(target=load, name="llmc-load", daemon=True).start()
    server.run()
    if failure:
        raise failure[0]


def _server_class(uvicorn):
    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM or SIGINT after its graceful shutdown, so the process would
        die by the signal; a signal is how a server is asked to stop, so llmc serve exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
    return Server
