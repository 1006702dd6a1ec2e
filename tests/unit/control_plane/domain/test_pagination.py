"""AIP-158 page tokens."""

from __future__ import annotations

import pytest

from control_plane.domain import pagination
from control_plane.domain.errors import DomainError as ApiError


def test_page_tokens_are_opaque_and_bound_to_their_query() -> None:
    q = pagination.query_hash("a")
    start, end, token = pagination.paginate(120, "", 50, q)
    assert (start, end) == (0, 50) and token
    assert pagination.paginate(120, token, 50, q)[:2] == (50, 100)
    with pytest.raises(ApiError):
        pagination.decode_token(token, pagination.query_hash("b"))
    with pytest.raises(ApiError):
        pagination.decode_token("%%%", q)
    assert pagination.page_size(0) == 50 and pagination.page_size(5000) == 1000


@pytest.mark.parametrize(
    "payload",
    [
        b'{"q":"Q","o":1e999}',
        b'{"q":"Q","o":Infinity}',
        b'{"q":"Q","o":NaN}',
        b'{"q":"Q","o":1.5}',
        b'{"q":"Q","o":true}',
        b'{"q":"Q","o":-1}',
        b'{"q":"Q","o":100000000000}',
        b'{"q":1,"o":1}',
        b"[1,2]",
        b"[" * 5000 + b"]" * 5000,
        b"\xff\xfe",
    ],
)
def test_crafted_page_tokens_are_invalid_argument_never_a_crash(payload: bytes) -> None:
    import base64

    token = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    with pytest.raises(ApiError) as e:
        pagination.decode_token(token, "Q")
    assert e.value.reason == "INVALID_PAGE_TOKEN"


def test_an_overlong_page_token_is_refused_before_decoding() -> None:
    with pytest.raises(ApiError):
        pagination.decode_token("A" * 100_000, "Q")
