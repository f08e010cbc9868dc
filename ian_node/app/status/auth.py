"""The status page's login, session cookie and CSRF protection.

With ``api.token`` set, the page asks for the token once (a form) and then carries a session cookie:

- the cookie holds ``<issued>.<nonce>.<mac>``, an HMAC-SHA256 over the first two under a key derived
  from the token, never the token itself. It is ``HttpOnly`` (scripts cannot read it),
  ``SameSite=Strict`` (no other site's page sends it), ``Secure`` when served over HTTPS, and lasts
  :data:`SESSION_MAX_AGE_S`. A new token invalidates every session; a restart does not.
- a page POST (retry, logout) must carry the session's CSRF token (an HMAC of its nonce: another
  site cannot read it) in a form field, and its ``Origin`` (or, without one, ``Referer``) must be
  this host. Without a token configured, the page is open and the CSRF token is an HMAC under a
  random per-process key: still out of another site's reach.

The cookie opens only the page's own routes (the page, the job pages, their pictures, the live
JSON and the retry button); the JSON API keeps its bearer token and never reads the cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

#: The session cookie's name and lifetime (seconds).
SESSION_COOKIE = "ian_node_session"
SESSION_MAX_AGE_S = 12 * 3600
#: The form field that carries the CSRF token.
CSRF_FIELD = "csrf"
_KEY_LABEL = b"ian-node status page session v1"


@dataclass(frozen=True)
class Session:
    """A verified session cookie."""

    issued_at: int
    nonce: str


def _mac(key: bytes, message: str) -> str:
    digest = hmac.new(key, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


class PageAuth:
    """Sessions and CSRF tokens for one node; ``required`` when the node has a token."""

    def __init__(self, token: str | None, clock: Callable[[], float] = time.time) -> None:
        self.required = token is not None
        self._token = None if token is None else token.encode()
        self._key = (hmac.new(self._token, _KEY_LABEL, hashlib.sha256).digest() if self._token is not None
                     else secrets.token_bytes(32))
        self._clock = clock

    def token_matches(self, presented: str) -> bool:
        """Whether a login form's token is the node's (constant time)."""
        return self._token is not None and hmac.compare_digest(presented.strip().encode(), self._token)

    def new_session(self) -> str:
        """A fresh session cookie value (after a good login)."""
        value = f"{int(self._clock())}.{secrets.token_urlsafe(18)}"
        return f"{value}.{_mac(self._key, 'session|' + value)}"

    def session(self, cookie: str | None) -> Session | None:
        """The session a cookie carries, when its MAC is right and it has not expired; else None."""
        if not self.required or not cookie or cookie.count(".") != 2:
            return None
        issued, nonce, mac = cookie.split(".")
        if not hmac.compare_digest(mac.encode(), _mac(self._key, f"session|{issued}.{nonce}").encode()):
            return None
        if not issued.isdigit() or not 0 <= self._clock() - int(issued) < SESSION_MAX_AGE_S:
            return None
        return Session(int(issued), nonce)

    def csrf_token(self, session: Session | None) -> str:
        """The token a page's forms carry: bound to the session (or to this process on an open page)."""
        return _mac(self._key, "csrf|" + (session.nonce if session is not None else "open"))

    def csrf_matches(self, session: Session | None, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf_token(session).encode())


def same_origin(headers: Mapping[str, str]) -> bool:
    """Whether a POST comes from a page of this host: its ``Origin`` (else ``Referer``) names the ``Host``.

    A request with neither (a script, not a browser) passes here; the CSRF token still stops it.
    The scheme is not compared, so that a TLS-terminating proxy that keeps the Host header works.
    """
    host = headers.get("host", "").lower()
    origin = headers.get("origin")
    if origin is None:
        referer = headers.get("referer")
        if referer is None:
            return True
        origin = referer
    if origin == "null":
        return False
    return bool(host) and urlsplit(origin).netloc.lower() == host
