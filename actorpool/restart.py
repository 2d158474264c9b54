"""Noticing that an app asked to be restarted, Passenger's way.

An app restarts when its ``tmp/restart.txt`` changes (is created, touched or
replaced; it may be a file or a directory) or, on every look, while
``tmp/always_restart.txt`` exists. Looks are throttled to one per
``check_interval`` seconds per app, so a busy app costs one ``stat`` a
second, not one per request.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["RestartWatcher"]

_Stamp = tuple[int, int, int] | None

MAX_APPS = 10_000
"""Most app roots remembered; the least recently looked at is forgotten first."""


class RestartWatcher:
    """Remembers each app's ``restart.txt`` and says when it changed."""

    def __init__(
        self,
        check_interval: float,
        stat: Callable[[str], os.stat_result] = os.stat,
    ) -> None:
        self.check_interval = check_interval
        self._stat = stat
        self._stamps: dict[str, _Stamp] = {}
        self._checked_at: dict[str, float] = {}

    def __repr__(self) -> str:
        return (
            f"<RestartWatcher apps={len(self._stamps)} interval={self.check_interval}>"
        )

    def should_restart(self, app_root: str, now: float) -> bool:
        """Whether ``app_root`` asked for a restart since the last look."""
        last = self._checked_at.get(app_root)
        if last is not None and now - last < self.check_interval:
            return False
        self._checked_at[app_root] = now
        always = self._exists(os.path.join(app_root, "tmp", "always_restart.txt"))
        # Learn restart.txt even while always_restart.txt exists, so that a
        # touch made then does not restart the app again once it is removed.
        stamp = self._stamp(os.path.join(app_root, "tmp", "restart.txt"))
        known = app_root in self._stamps
        previous = self._stamps.pop(app_root, None)
        self._stamps[app_root] = stamp  # re-inserted: the dict is in look order
        if len(self._stamps) > MAX_APPS:
            # Any client may name any path: keep memory bounded by forgetting
            # the app looked at least recently (its next look learns again).
            oldest = next(iter(self._stamps))
            self.forget(oldest)
        if always:
            return True
        # The first look only learns the stamp; a vanished file is no request.
        return known and stamp is not None and stamp != previous

    def forget(self, app_root: str) -> None:
        """Drop what is known of ``app_root``."""
        self._stamps.pop(app_root, None)
        self._checked_at.pop(app_root, None)

    def _stamp(self, path: str) -> _Stamp:
        try:
            st = self._stat(path)
        except (OSError, ValueError):  # ValueError: a NUL in the path
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_ctime_ns)

    def _exists(self, path: str) -> bool:
        try:
            self._stat(path)
        except (OSError, ValueError):  # ValueError: a NUL in the path
            return False
        return True
