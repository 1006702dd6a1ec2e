"""The console's session rules: CSRF tokens bound to the session, bounded tokens, same origin."""

from __future__ import annotations

from control_plane.console import session


def test_the_csrf_token_is_bound_to_its_session_and_checked_in_constant_time() -> None:
    a, b = session.csrf_token("gpf_a_secret"), session.csrf_token("gpf_b_secret")
    assert a != b and len(a) == 64
    assert session.csrf_ok("gpf_a_secret", a)
    assert not session.csrf_ok("gpf_a_secret", b)
    assert not session.csrf_ok("gpf_a_secret", "")


def test_only_printable_bounded_tokens_reach_the_api() -> None:
    assert session.plausible_token("gpf_0123456789ab_" + "x" * 43)
    assert not session.plausible_token("")
    assert not session.plausible_token("gpf_a b")  # a space
    assert not session.plausible_token("gpf_\x1b[2J")  # a terminal escape
    assert not session.plausible_token("x" * (session.MAX_TOKEN_CHARS + 1))


def test_a_write_from_another_origin_is_refused_and_one_without_an_origin_header_is_judged_by_csrf() -> None:
    assert session.same_origin("http://127.0.0.1:8080", "http", "127.0.0.1:8080")
    assert not session.same_origin("https://evil.example", "http", "127.0.0.1:8080")
    assert not session.same_origin("null", "http", "127.0.0.1:8080")
    assert session.same_origin(None, "http", "127.0.0.1:8080")


def test_every_page_forbids_inline_code_frames_and_other_origins() -> None:
    csp = session.CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp and "form-action 'self'" in csp
    assert session.SECURITY_HEADERS["x-content-type-options"] == "nosniff"
