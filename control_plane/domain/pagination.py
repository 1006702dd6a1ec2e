"""AIP-158 page tokens: opaque, tied to the query that produced them."""

from __future__ import annotations

import base64
import hashlib
import json

from control_plane.domain import errors

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_TOKEN_LENGTH = 512  # our tokens are ~50 characters
MAX_OFFSET = 10_000_000


def page_size(requested: int) -> int:
    if requested < 0:
        raise errors.invalid("INVALID_PAGE_SIZE", "page_size must not be negative", field="page_size")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def query_hash(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def encode_token(query: str, offset: int) -> str:
    raw = json.dumps({"q": query, "o": offset}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, query: str) -> int:
    """The offset a page token points at; 0 for the first page."""
    if not token:
        return 0
    malformed = errors.invalid("INVALID_PAGE_TOKEN", "page_token is malformed", field="page_token")
    if len(token) > MAX_TOKEN_LENGTH:
        raise malformed
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        d = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: deeply nested arrays
        raise malformed from e
    # Only what encode_token writes: an object with a string query and an integer offset (not a
    # float, not Infinity, not a bool), within bounds.
    if not isinstance(d, dict) or not isinstance(d.get("q"), str):
        raise malformed
    offset = d.get("o")
    if type(offset) is not int or not 0 <= offset <= MAX_OFFSET:
        raise malformed
    if d["q"] != query:
        raise errors.invalid(
            "INVALID_PAGE_TOKEN", "page_token belongs to a different query", field="page_token"
        )
    return offset


def paginate(total: int, token: str, size: int, query: str) -> tuple[int, int, str]:
    """(start, end, next_token) of the requested page over `total` ordered results."""
    start = decode_token(token, query)
    end = min(start + size, total)
    return start, end, encode_token(query, end) if end < total else ""


# Key-based pages (AIP-158 over a key range): the token holds the last key returned (relative
# to the range) and the query's hash, so a page costs the keys it returns whatever came before
# it, and leases created between pages neither repeat nor push others out of the next page.
MAX_CURSOR = 300


def encode_cursor(query: str, last: str) -> str:
    raw = json.dumps({"q": query, "k": last}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str, query: str) -> str:
    """The last key of the previous page ("" for the first page)."""
    if not token:
        return ""
    malformed = errors.invalid("INVALID_PAGE_TOKEN", "page_token is malformed", field="page_token")
    if len(token) > MAX_TOKEN_LENGTH:
        raise malformed
    try:
        d = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, RecursionError) as e:
        raise malformed from e
    if not isinstance(d, dict) or not isinstance(d.get("q"), str):
        raise malformed
    last = d.get("k")
    if not isinstance(last, str) or not 0 < len(last) <= MAX_CURSOR:
        raise malformed
    if d["q"] != query:
        raise errors.invalid(
            "INVALID_PAGE_TOKEN", "page_token belongs to a different query", field="page_token"
        )
    return last
