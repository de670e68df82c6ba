"""Launch the studio UI on a free local port for end-to-end tests, as studio.py launches it."""

from __future__ import annotations

import contextlib
import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def launched(services, logins=None, throttle=None):
    from studio.ui.app import build_app
    from studio.ui.launch import launch_options

    app = build_app(services)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                       **launch_options(services, logins=logins, throttle=throttle))
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def handler(app_or_services, name: str):
    """The function the page's event `name` runs, as the app registers it (behind its permission and argument
    checks); an app, or the services to build one for."""
    from studio.ui.app import build_app

    app = app_or_services if hasattr(app_or_services, "fns") else build_app(app_or_services)
    return next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == name)
