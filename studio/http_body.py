"""Reading an HTTP request's body within limits, as the page's guard and the API server both do.

The body is read as it arrives and given up once it is known to be too long (by its declared length or
by what came), so a client cannot make the server hold more than the limit in memory. A body that stops
arriving (one byte now and then, to keep connections open) is given up too: `SlowBody` after
IDLE_S seconds without a byte, or once the whole body is late (MIN_BYTES_PER_S from its start).

`json_values_over` counts a JSON body's values without parsing it where it can: parsing a 2 MB body
of empty lists took 0.2 s of the server's event loop, for a request refused anyway.
"""

from __future__ import annotations

import asyncio
import re
import time

IDLE_S = 30.0
BASE_S = 60.0
MIN_BYTES_PER_S = 64 * 1024


class SlowBody(Exception):
    """The body did not arrive in time."""


async def body_within(scope, receive, limit: int, idle_s: float = IDLE_S) -> bytes | None:
    """The whole request body, or None once it is known to be longer than `limit` bytes (by its declared
    length, or while it arrives) or the client went away. SlowBody when it stops arriving."""
    declared = dict(scope.get("headers") or []).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    deadline = time.monotonic() + BASE_S + limit / MIN_BYTES_PER_S
    chunks, size = [], 0
    while True:
        wait = min(idle_s, deadline - time.monotonic())
        try:
            message = await asyncio.wait_for(receive(), timeout=max(wait, 0.001))
        except asyncio.TimeoutError:
            raise SlowBody(f"the request body stopped arriving ({size} bytes in)") from None
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body"):
            return b"".join(chunks)


# A string, its closing quote optional: without it, a body of unclosed strings made of escaped quotes was
# scanned from every quote to its end again (quadratic: a 140 KB body held the event loop 28 s).
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"?')


def json_values_over(body: bytes, most: int) -> bool:
    """Whether a JSON body holds more than `most` values (objects, lists, strings, numbers...), counted as
    separators and containers outside strings: an upper bound that is exact for the worst bodies. A body
    that is not JSON may be over-counted; the app refuses it anyway."""
    def bound(text: bytes) -> int:
        return text.count(b",") + text.count(b"[") + text.count(b"{") + 1

    if bound(body) <= most:  # commas inside strings counted too: still within the limit
        return False
    return bound(_JSON_STRING.sub(b'""', body)) > most
