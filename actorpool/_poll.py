"""Timeouts for ``select.poll``: milliseconds, capped at what it takes."""

from __future__ import annotations

import math
from typing import Final

MAX_POLL_MS: Final = 2**31 - 1
"""The longest ``poll()`` wait, in milliseconds (a C int; about 24.8 days)."""


def poll_ms(seconds: float) -> int:
    """A ``poll()`` timeout for ``seconds``, rounded up and capped.

    A wait longer than the cap ends early: callers keep their own deadline
    and poll again.
    """
    if not seconds * 1000 < MAX_POLL_MS:  # math.ceil refuses inf and NaN
        return MAX_POLL_MS
    return math.ceil(seconds * 1000)
