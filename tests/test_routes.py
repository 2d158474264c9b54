"""Routes: parsing ``actorpool serve``'s app arguments and matching requests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from actorpool.errors import ConfigError
from actorpool.frontend.routes import Route, Router, parse_route

# --- parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/srv/app", Route(None, "", "/srv/app")),
        ("/blog=/srv/blog", Route(None, "/blog", "/srv/blog")),
        ("/a/b=/srv/ab", Route(None, "/a/b", "/srv/ab")),
        ("example.com=/srv/site", Route("example.com", "", "/srv/site")),
        ("Example.COM=/srv/site", Route("example.com", "", "/srv/site")),
        ("example.com./blog=/srv/b", Route("example.com", "/blog", "/srv/b")),
        ("localhost/blog=/srv/blog", Route("localhost", "/blog", "/srv/blog")),
        ("127.0.0.1=/srv/ip", Route("127.0.0.1", "", "/srv/ip")),
        ("[::1]/x=/srv/v6", Route("[::1]", "/x", "/srv/v6")),
        ("/blog/=/srv/blog", Route(None, "/blog", "/srv/blog")),
        ("/=/srv/a=b", Route(None, "", "/srv/a=b")),
        ("/~user/v1.0;x=/srv/odd", Route(None, "/~user/v1.0;x", "/srv/odd")),
    ],
)
def test_parse_route_forms(text: str, expected: Route) -> None:
    assert parse_route(text) == expected


def test_a_relative_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    here = os.getcwd()
    assert parse_route("apps/hello").app_root == os.path.join(here, "apps/hello")
    assert parse_route("/p=../x").app_root == os.path.join(os.path.dirname(here), "x")
    assert parse_route("h=.").app_root == here


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "path is empty"),
        ("/blog=", "path is empty"),
        ("=/srv/app", "give HOST"),
        ("example.com:8080=/srv/app", "leave the port out"),
        ("exa mple.com=/srv/app", "not a valid host name"),
        ("-bad-.com=/srv/app", "not a valid host name"),
        ("*.example.com=/srv/app", "not a valid host name"),
        ("/a b=/srv/app", "may not contain ' '"),
        ("/caf%C3%A9=/srv/app", "may not contain '%'"),
        ("/a?b=/srv/app", "may not contain '?'"),
        ("/a//b=/srv/app", "empty, '.' or '..' segment"),
        ("/a/../b=/srv/app", "empty, '.' or '..' segment"),
        ("/./b=/srv/app", "empty, '.' or '..' segment"),
    ],
)
def test_bad_routes_are_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        parse_route(text)
    assert repr(text) in str(raised.value)


def test_duplicate_host_and_prefix_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"two routes for example\.com/blog"):
        Router(
            [
                parse_route("example.com/blog=/srv/a"),
                parse_route("EXAMPLE.com/blog/=/srv/b"),
            ]
        )
    with pytest.raises(ConfigError, match="two routes for any host/"):
        Router([parse_route("/srv/a"), parse_route("/=/srv/b")])


def test_same_prefix_on_different_hosts_is_fine() -> None:
    routes = [
        parse_route("/srv/a"),
        parse_route("a.test=/srv/b"),
        parse_route("b.test=/srv/c"),
    ]
    assert Router(routes).routes == tuple(routes)


# --- matching --------------------------------------------------------------------

ROOT = Route(None, "", "/srv/root")
BLOG = Route(None, "/blog", "/srv/blog")
BLOG_ADMIN = Route(None, "/blog/admin", "/srv/admin")
SITE = Route("site.test", "", "/srv/site")
SITE_SHOP = Route("site.test", "/shop", "/srv/shop")
V6 = Route("[::1]", "/v6", "/srv/v6")


@pytest.fixture
def router() -> Router:
    return Router([ROOT, BLOG, BLOG_ADMIN, SITE, SITE_SHOP, V6])


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        (None, "/", (ROOT, "", "/")),
        (None, "", (ROOT, "", "")),
        (None, "*", (ROOT, "", "*")),
        ("other.test", "/x/y", (ROOT, "", "/x/y")),
        (None, "/blog", (BLOG, "/blog", "")),
        (None, "/blog/", (BLOG, "/blog", "/")),
        (None, "/blog/post/1", (BLOG, "/blog", "/post/1")),
        (None, "/blogx", (ROOT, "", "/blogx")),
        (None, "/blog/adminx", (BLOG, "/blog", "/adminx")),
        (None, "/blog/admin/users", (BLOG_ADMIN, "/blog/admin", "/users")),
        (None, "/Blog", (ROOT, "", "/Blog")),
        (None, "/blog%2Fx", (ROOT, "", "/blog%2Fx")),
        ("site.test", "/blog/x", (SITE, "", "/blog/x")),
        ("site.test", "/shop/cart", (SITE_SHOP, "/shop", "/cart")),
        ("SITE.Test:8080", "/shop", (SITE_SHOP, "/shop", "")),
        ("site.test.", "/", (SITE, "", "/")),
        ("site.test:", "/", (SITE, "", "/")),
        ("other.test", "/shop", (ROOT, "", "/shop")),
        ("[::1]:8080", "/v6/x", (V6, "/v6", "/x")),
        ("[::1]", "/v6", (V6, "/v6", "")),
    ],
)
def test_match(
    router: Router, host: str | None, path: str, expected: tuple[Route, str, str]
) -> None:
    assert router.match(host, path) == expected


def test_host_routes_come_before_host_less_ones_even_if_shorter() -> None:
    router = Router([BLOG, SITE])
    assert router.match("site.test", "/blog/x") == (SITE, "", "/blog/x")
    assert router.match("elsewhere.test", "/blog/x") == (BLOG, "/blog", "/x")


def test_no_match() -> None:
    router = Router([BLOG, SITE_SHOP])
    assert router.match(None, "/") is None
    assert router.match(None, "/blogx") is None
    assert router.match("site.test", "/") is None
    assert router.match("other.test", "/shop") is None
    assert router.match(None, "*") is None
    assert Router([]).match("site.test", "/") is None


def test_route_order_does_not_matter_for_longest_prefix() -> None:
    for routes in ([BLOG, BLOG_ADMIN], [BLOG_ADMIN, BLOG]):
        router = Router(routes)
        assert router.match(None, "/blog/admin") == (BLOG_ADMIN, "/blog/admin", "")
        assert router.routes == tuple(routes)
