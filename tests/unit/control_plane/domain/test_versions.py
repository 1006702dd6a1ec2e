from __future__ import annotations

import pytest

from control_plane.domain import versions
from control_plane.domain.errors import Code, DomainError
from control_plane.domain.versions import Release

REPLICA = Release(0, 4, 1)


@pytest.mark.parametrize(
    "daemon", ["0.4.0", "0.4.9", "0.3.2", "0.2.0", "0.2.0-rc.1", "0.4.1+build.7", "0.4.2.dev0", "0.4.0rc1"]
)
def test_daemons_of_this_release_and_up_to_two_older_are_accepted(daemon: str) -> None:
    versions.check_daemon(daemon, REPLICA)


@pytest.mark.parametrize(
    ("daemon", "says"),
    [
        ("0.1.9", "older"),
        ("0.5.0", "newer"),
        ("1.4.0", "newer"),
        ("", "not a release"),
        ("bench", "not a release"),
        ("0.4", "not a release"),
        ("0.4.0.1", "not a release"),
        ("0.4.0 ", "not a release"),
        ("00.4.0", "not a release"),
        ("v0.4.0", "not a release"),
    ],
)
def test_a_daemon_outside_the_skew_policy_is_refused_saying_why(daemon: str, says: str) -> None:
    with pytest.raises(DomainError) as e:
        versions.check_daemon(daemon, REPLICA)
    assert e.value.code == Code.FAILED_PRECONDITION
    assert e.value.reason == "DAEMON_VERSION_UNSUPPORTED"
    assert says in e.value.message and "0.2.x to 0.4.x" in e.value.message


def test_a_new_major_release_accepts_no_daemon_of_the_previous_major() -> None:
    with pytest.raises(DomainError):
        versions.check_daemon("0.9.0", Release(1, 0, 0))
    versions.check_daemon("1.0.3", Release(1, 1, 0))


def test_the_release_of_this_build_parses() -> None:
    from gpufed import __version__

    assert __version__.startswith(str(versions.release(__version__)))  # 0.3.0.dev0 is 0.3.0
    with pytest.raises(ValueError):
        versions.release("dev")
