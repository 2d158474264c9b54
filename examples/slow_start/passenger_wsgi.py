"""A WSGI app with a slow, memory-hungry start-up (see ``heavy.py``).

Every request gets ``200 slow start ready``. It is the app whose spawn time
and memory per instance ``benchmarks/bench_spawn.py`` compares between
``DirectSpawner`` and ``SmartSpawner``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

# heavy.py sits next to this file. Put the app root on the path ourselves
# rather than rely on whoever loads us (worker, preloader, a test) to do it.
_APP_ROOT = os.path.dirname(os.path.abspath(__file__))
if _APP_ROOT not in sys.path:
    sys.path.insert(0, _APP_ROOT)

import heavy  # noqa: E402 (needs the path set above)

BODY = b"slow start ready\n"


def application(
    environ: dict[str, Any], start_response: Callable[..., Any]
) -> Iterable[bytes]:
    """Answer any request with ``slow start ready``, after a table look-up."""
    # Read the table as a real app would read its data; the answer does not
    # depend on it.
    heavy.lookup(environ.get("PATH_INFO", "/").encode())
    start_response(
        "200 OK",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))],
    )
    return [BODY]
