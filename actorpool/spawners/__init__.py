"""Real application processes: :class:`DirectSpawner` and :class:`SmartSpawner`.

Both run an app root of either kind (see :mod:`actorpool.spawners.approot`):
a ``passenger_wsgi.py`` app served by the bundled worker, or an
``actorpool.toml`` command. Every process they start exits when the server
does, however the server ends (see ``actorpool.spawners._process``).
"""

from __future__ import annotations

from actorpool.spawners.direct import DirectSpawner
from actorpool.spawners.smart import SmartSpawner

__all__ = ["DirectSpawner", "SmartSpawner"]
