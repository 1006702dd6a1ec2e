"""The console's session: the token in a cookie, the CSRF token derived from it, the headers
every response carries. Pure functions: no I/O."""

from __future__ import annotations

import hashlib
import hmac

COOKIE = "gpufed_session"
KIND_COOKIE = "gpufed_kind"  # which views to show; the API decides what the token may do
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
MAX_TOKEN_CHARS = 512  # far above a gpufed token's length; a cookie stays well under 4 KB
KINDS = ("tenant", "provider", "admin")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    # same-origin: a form post then carries its Origin (no-referrer makes it "null"), which
    # writes are checked against; other sites get no referrer.
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cache-control": "no-store",
}


def csrf_token(session_token: str) -> str:
    """The CSRF token of a session: a MAC of the session's secret, so any replica can check it
    and a page of another origin, which cannot read the cookie, cannot make it."""
    return hmac.new(session_token.encode(), b"gpufed-console-csrf/1", hashlib.sha256).hexdigest()


def csrf_ok(session_token: str, given: str) -> bool:
    return bool(given) and hmac.compare_digest(csrf_token(session_token), given)


def plausible_token(token: str) -> bool:
    """A token worth asking the API about: printable ASCII, bounded (the API says the rest)."""
    return 0 < len(token) <= MAX_TOKEN_CHARS and all(33 <= ord(c) < 127 for c in token)


def same_origin(origin: str | None, scheme: str, host: str) -> bool:
    """A write's Origin header, when the browser sends one, names this console."""
    return origin is None or origin == f"{scheme}://{host}"
