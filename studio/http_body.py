"""Reading an HTTP request's body with a size limit, as the page's guard and the API server both do.

The body is read as it arrives and given up once it is known to be too long (by its declared length or
by what came), so a client cannot make the server hold more than the limit in memory.
"""

from __future__ import annotations


async def body_within(scope, receive, limit: int) -> bytes | None:
    """The whole request body, or None once it is known to be longer than `limit` bytes (by its declared
    length, or while it arrives) or the client went away."""
    declared = dict(scope.get("headers") or []).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body"):
            return b"".join(chunks)
