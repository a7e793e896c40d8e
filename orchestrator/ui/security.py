"""What keeps another web page from acting through the user's browser.

A state-changing request must pass three independent checks:

1. The browser's own word on where it comes from: `Sec-Fetch-Site` must be
   `same-origin` (or `none`, typed by the user); an older browser that does not send
   it must send an `Origin` naming this server. Another port on the same host is
   another origin, so a page served by any other local program is refused too.
2. A token that only this server's pages carry: an HMAC of a random per-browser
   nonce (kept in a SameSite=Strict, HttpOnly cookie) under a per-process secret
   (or ORCHESTRATOR_UI_SECRET). Another origin can neither read the page that holds
   it nor compute it.
3. The Host header must name this server (loopback names when bound to loopback),
   which stops DNS rebinding: a hostile name resolved to 127.0.0.1 reads nothing.

Every response also carries a Content-Security-Policy that allows only this server's
own script and style files and no inline script, so even markup that escaped the
templates' escaping could not run.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "orchestrator_csrf"
FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


class Refused(Exception):
    """A request refused before it could change anything; the message says why."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Tokens:
    def __init__(self, secret: str | None = None):
        self._key = (secret or secrets.token_urlsafe(32)).encode()

    def nonce(self, request: Request) -> tuple[str, bool]:
        """The browser's nonce, and whether it is new (to be set as a cookie)."""
        found = request.cookies.get(COOKIE, "")
        if 16 <= len(found) <= 128 and found.isascii():
            return found, False
        return secrets.token_urlsafe(24), True

    def token(self, nonce: str) -> str:
        return hmac.new(self._key, nonce.encode(), hashlib.sha256).hexdigest()

    def check(self, request: Request, submitted: str | None) -> None:
        nonce = request.cookies.get(COOKIE)
        if not nonce or not submitted:
            raise Refused("missing form token: reload the page and try again")
        if not hmac.compare_digest(self.token(nonce), submitted):
            raise Refused("invalid form token: reload the page and try again")


def check_same_origin(request: Request) -> None:
    """Refuse what the browser says came from another site or origin.

    `Sec-Fetch-Site` is the browser's own view (right even behind a proxy that
    rewrites Host); without it, an `Origin` must name the Host that was asked for;
    a request with neither comes from no browser, and still needs the token.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        if site in ("same-origin", "none"):
            return
        raise Refused(f"cross-site request refused (Sec-Fetch-Site: {site})")
    origin = request.headers.get("origin")
    if origin is None:
        return
    if origin == "null" or urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
        raise Refused(f"cross-origin request refused (Origin: {origin[:200]})")


class Guard:
    """ASGI middleware: the Host check on every request, security headers on every
    response."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None):
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    def _host_ok(self, scope: Scope) -> bool:
        if self.allowed is None:
            return True
        host = Headers(scope=scope).get("host", "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *HEADERS]
            await send(message)

        if not self._host_ok(scope):
            body = b"unknown Host header: open this server by its own address"
            await with_headers({"type": "http.response.start", "status": 421, "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, with_headers)
