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
