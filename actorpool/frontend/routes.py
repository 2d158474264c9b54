"""Which app serves a request: routes by host name and path prefix.

A route mounts an app root at a path prefix, for one host name or for any.
``actorpool serve`` reads them from the command line (:func:`parse_route`)
and a :class:`Router` picks one per request, as Passenger's ``passenger_base_uri``
and virtual hosts do.
"""

from __future__ import annotations

import dataclasses
import os
import re
import string
from collections.abc import Sequence

from actorpool.errors import ConfigError

__all__ = ["Route", "Router", "parse_route"]

# A prefix is matched against the raw, still %-encoded request path, so it
# may only hold characters a URL path carries literally (RFC 3986 pchar
# without "%"): anything else could never match.
_PREFIX_CHARS = frozenset(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/")
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_IPV6_HOST = re.compile(r"\[[0-9a-f:.]+\]")


@dataclasses.dataclass(frozen=True)
class Route:
    """An app root mounted at a path prefix, for one host or for every host."""

    host: str | None
    """Lower-case host name without port; ``None`` matches any host."""
    prefix: str
    """``""`` for the root, else like ``/blog`` (no trailing slash)."""
    app_root: str
    """Absolute path of the application's root directory."""


def parse_route(text: str) -> Route:
    """Parse ``PATH``, ``/PREFIX=PATH``, ``HOST=PATH`` or ``HOST/PREFIX=PATH``.

    ``PATH`` is made absolute. A ``PATH`` that itself holds ``=`` can be
    written ``/=PATH`` (mounted at the root). Raises
    :class:`~actorpool.errors.ConfigError` on bad input.
    """
    mount, equals, path = text.partition("=")
    if not equals:
        mount, path = "/", text
    if not path:
        raise ConfigError(f"route {text!r}: the app root path is empty")
    host_part, slash, prefix_part = mount.partition("/")
    host = _parse_host(host_part, text) if host_part else None
    if not slash and host is None:
        raise ConfigError(f"route {text!r}: give HOST, /PREFIX or HOST/PREFIX before =")
    prefix = _parse_prefix("/" + prefix_part, text)
    return Route(host=host, prefix=prefix, app_root=os.path.abspath(path))


def _parse_host(host: str, text: str) -> str:
    """A route's host name, lower-cased; refuses ports and odd characters."""
    host = host.lower().removesuffix(".")
    if _HOST_NAME.fullmatch(host) or _IPV6_HOST.fullmatch(host):
        return host
    if ":" in host and not host.startswith("["):
        raise ConfigError(
            f"route {text!r}: leave the port out of the host name "
            "(routes match every port)"
        )
    raise ConfigError(f"route {text!r}: {host!r} is not a valid host name")


def _parse_prefix(prefix: str, text: str) -> str:
    """A route's path prefix, without trailing slash (``""`` for the root)."""
    prefix = prefix.rstrip("/")
    bad = sorted(set(prefix) - _PREFIX_CHARS)
    if bad:
        raise ConfigError(
            f"route {text!r}: the prefix may not contain {''.join(bad)!r} "
            "(write it as it appears in URLs, without %-escapes)"
        )
    segments = prefix.split("/")[1:]
    if any(segment in ("", ".", "..") for segment in segments):
        raise ConfigError(
            f"route {text!r}: the prefix has an empty, '.' or '..' segment"
        )
    return prefix


class Router:
    """Picks the route for a request by its Host header and path."""

    def __init__(self, routes: Sequence[Route]) -> None:
        """Index `routes`; :class:`ConfigError` if two share host and prefix."""
        self.routes: tuple[Route, ...] = tuple(routes)
        """Every route, in the order given."""
        self._by_host: dict[str | None, list[Route]] = {}
        for route in self.routes:
            same = self._by_host.setdefault(route.host, [])
            if any(other.prefix == route.prefix for other in same):
                where = f"{route.host or 'any host'}{route.prefix or '/'}"
                raise ConfigError(f"two routes for {where}")
            same.append(route)
        # Longest prefix first, so the first match is the most specific.
        for same in self._by_host.values():
            same.sort(key=lambda route: len(route.prefix), reverse=True)

    def __repr__(self) -> str:
        return f"Router({list(self.routes)!r})"

    def match(self, host: str | None, path: str) -> tuple[Route, str, str] | None:
        """``(route, script_name, path_info)`` for a request, or None.

        `host` is the Host header (port and case ignored); `path` the raw,
        still %-encoded path without query. Routes for the request's host
        are tried before host-less ones; among them the longest prefix that
        matches at a segment boundary (``/blog`` matches ``/blog`` and
        ``/blog/x``, not ``/blogx``). ``script_name`` is the prefix and
        ``path_info`` exactly the rest of the path.
        """
        name = _host_name(host)
        candidates = [*self._by_host.get(name, []), *self._by_host.get(None, [])]
        for route in candidates:
            if _under(path, route.prefix):
                return route, route.prefix, path[len(route.prefix) :]
        return None


def _host_name(host: str | None) -> str | None:
    """The host name of a Host header: lower case, no port, no trailing dot."""
    if host is None:
        return None
    host = host.strip().lower()
    name, colon, port = host.rpartition(":")
    # "[::1]" has colons but no port; only digits after the last one are one.
    if colon and (port == "" or port.isdigit()) and not name.endswith(":"):
        host = name
    return host.removesuffix(".") or None


def _under(path: str, prefix: str) -> bool:
    """Whether `path` is `prefix` or below it, at a segment boundary."""
    if not prefix:
        return True
    return path == prefix or path.startswith(prefix + "/")
