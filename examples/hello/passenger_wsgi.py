"""The smallest WSGI app: every request gets ``200 hello world``.

The bundled worker imports this file from the app root and serves
``application``; it is the baseline for spawn time and per-process memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

BODY = b"hello world\n"


def application(
    environ: dict[str, Any], start_response: Callable[..., Any]
) -> Iterable[bytes]:
    """Answer any request with ``hello world``."""
    start_response(
        "200 OK",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))],
    )
    return [BODY]
