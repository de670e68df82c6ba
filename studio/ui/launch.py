"""Launching the studio's page: login, the guard middleware, upload limits, the footer.

One function gives the keyword arguments of `gr.Blocks.launch`, so the command line and the tests
launch the same server.
"""

from __future__ import annotations

from starlette.middleware import Middleware

from studio.access import DEMO_SUMMARY, is_loopback
from studio.config import PROJECT_ROOT
from studio.ui.guard import LoginThrottle, StudioGuard

CSS = PROJECT_ROOT / "assets" / "studio.css"


def launch_options(services, *, logins: list[tuple[str, str]] | None = None,
                   throttle: LoginThrottle | None = None, host: str = "127.0.0.1", share: bool = False) -> dict:
    """Keyword arguments for `app.launch(...)` under this studio's access policy, for a page served on
    `host` (with a public share link when `share`)."""
    demo = services.policy.is_demo
    max_bytes = int(services.max_upload_mb * 2**20)
    guard = Middleware(StudioGuard, throttle=throttle or LoginThrottle(), max_upload_bytes=max_bytes,
                       uploads_allowed=services.policy.allows("upload"), login_required=bool(logins),
                       lang=getattr(services, "lang", None), local_only=is_loopback(host) and not share)
    return {
        "auth": logins or None,
        "show_error": False,  # the studio's own refusals are gr.Error and show; other errors' text (a
                              # parser's echo of a hostile input) does not reach the page
        "footer_links": [] if demo else ["api"],
        "max_file_size": max_bytes,
        "app_kwargs": {"middleware": [guard], "openapi_url": None},  # no route list outside the login
        "enable_monitoring": False,  # Gradio's /monitoring routes: per-event counts, and no login on some
        "css_paths": [CSS],
    }


def share_warning(services, share: bool, host: str) -> str:
    """What the owner should read before a page without a login goes public ('' when none is needed)."""
    if not services.policy.is_demo or (not share and is_loopback(host)):
        return ""
    where = "a public share link" if share else f"{host}, which other machines can reach"
    return (f"WARNING: the studio is served on {where} without a login, so it runs in {DEMO_SUMMARY}. "
            "Anyone with the address can use that. Use --auth USER:PASS (or --auth-file / STUDIO_AUTH) for the "
            "full studio.")
