"""Running the app with uvicorn: in the foreground (the command line) or in a background thread
(:class:`ServerThread`, for tests and notebooks)."""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Optional

__all__ = ["ServerThread", "serve"]


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` until Ctrl-C."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


class ServerThread:
    """``app`` served by uvicorn in a daemon thread, on ``port`` (0: a free port, bound before the
    thread starts, so there is no race for it); a context manager that waits until the server
    answers and stops it on exit. ``url`` is its base URL.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
        self.thread: Optional[threading.Thread] = None

    def start(self, timeout: float = 30.0) -> "ServerThread":
        """Start serving; returns once the server accepts connections."""
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the server to finish (open streams are closed) and wait for its thread."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
