"""Run an ASGI app (the fake teacher, the fake hub) on a free port of 127.0.0.1 in a background thread."""

from __future__ import annotations

import socket
import threading
import time


class LocalServer:
    """`start(app)` serves until `stop()`; `port` is the port it listens on."""

    port: int = 0

    def start_app(self, app) -> None:
        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 10
        while not getattr(self._server, "started", False) and time.time() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)
