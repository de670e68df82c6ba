"""Requests that a web page of another site made the browser send to a studio on this machine.

A studio served on 127.0.0.1 without a login (the default) gives full access to whoever reaches it,
and a browser on this machine reaches it for any page it shows:
- DNS rebinding: a page's own name starts resolving to 127.0.0.1, and the page's scripts then read the
  studio as their own site. Those requests name the page's host in their Host header.
- A page of another origin (another app on localhost:3000, say) calls the studio across origins, which
  Gradio's CORS answers for localhost origins. Those requests carry that page's Origin.
- A page of another origin embeds the studio (an iframe under decoy buttons, an image or script tag):
  the browser sends no Origin there, but says where the request comes from in Sec-Fetch-Site.
So on loopback every request must name a loopback host, a request that carries an Origin must come from
the very host and port it is sent to, and a browser's request from another origin is refused unless it
is a top-level navigation (a link followed to the studio opens it). Programs (curl, the openai client,
gradio_client) send neither header and are not affected. A studio served to other machines (--host,
--share) has a login or runs in demo mode instead, and is not checked here. Every page of the studio
also tells browsers not to show it inside another site's frame (`FRAME_HEADERS`, sent by the guard).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from studio.access import is_loopback

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
FRAME_HEADERS = [(b"x-frame-options", b"SAMEORIGIN"), (b"content-security-policy", b"frame-ancestors 'self'")]


def _split_host(value: str) -> tuple[str, int | None]:
    """'127.0.0.1:7860' -> ('127.0.0.1', 7860); '[::1]' -> ('::1', None); a port that is no number -> -1."""
    parts = urlsplit("//" + value)
    try:
        port = parts.port
    except ValueError:
        port = -1
    return (parts.hostname or "").lower(), port


def local_request_problem(scope) -> tuple[str, dict] | None:
    """Why a request to a loopback-only studio is refused, as (message key, values); None when it may pass."""
    headers = dict(scope.get("headers") or [])
    host_header = headers.get(b"host", b"").decode("latin-1").strip()
    host, port = _split_host(host_header)
    if not is_loopback(host):
        return "guard_foreign_host", {"host": host_header[:100] or "(none)"}
    origin = headers.get(b"origin")
    if origin is None:
        return _cross_site_problem(headers)
    origin_text = origin.decode("latin-1").strip()
    parts = urlsplit(origin_text)
    try:
        origin_port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        origin_port = -1
    default = DEFAULT_PORTS["https" if scope.get("scheme") in ("https", "wss") else "http"]
    same = (parts.hostname or "").lower() == host and origin_port == (port or default)
    return None if same and host else ("guard_foreign_origin", {"origin": origin_text[:100]})


def _cross_site_problem(headers: dict) -> tuple[str, dict] | None:
    """A browser's request without an Origin that another origin's page made (an iframe, an image or a
    script tag); a top-level navigation (a followed link) may pass."""
    site = headers.get(b"sec-fetch-site", b"").decode("latin-1").strip().lower()
    if site in ("", "same-origin", "none"):
        return None
    navigation = (headers.get(b"sec-fetch-mode", b"").lower() == b"navigate"
                  and headers.get(b"sec-fetch-dest", b"document").lower() == b"document")
    return None if navigation else ("guard_foreign_origin", {"origin": f"Sec-Fetch-Site: {site[:20]}"})
