"""RELEASES and the refs it resolves to: the previous release for tests/upgrade and the last
one for buf breaking, in a clone with tags and in one without (CI's)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from scripts import releases

Git = Callable[..., subprocess.CompletedProcess[str]]
ONE = "v0.1.0 " + "a" * 40
TWO = "v0.2.0 " + "b" * 40
THREE = "v0.2.1 " + "c" * 40


def _with(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    real = releases.listed
    monkeypatch.setattr(releases, "listed", lambda: real(text))


def test_the_file_lists_every_tagged_release_with_a_full_commit() -> None:
    listed = releases.listed()
    assert listed and listed[0].tag == "v0.1.0"
    assert all(len(r.commit) == 40 for r in listed)


@pytest.mark.parametrize(
    "line", ["v0.1.0 abc", "0.1.0 " + "a" * 40, "v0.1 " + "a" * 40, "v0.1.0 " + "A" * 40, "v0.1.0"]
)
def test_a_malformed_line_is_an_error_not_a_skipped_release(line: str) -> None:
    with pytest.raises(ValueError, match="RELEASES line 2"):
        releases.listed("# comment\n" + line + "\n")


def test_previous_is_the_newest_of_an_earlier_minor_release(monkeypatch: pytest.MonkeyPatch) -> None:
    _with(monkeypatch, "\n".join([ONE, TWO, THREE]))
    assert releases.previous("0.3.0.dev0").tag == "v0.2.1"
    assert releases.previous("0.2.1").tag == "v0.1.0"
    with pytest.raises(releases.NoRelease):
        releases.previous("0.1.5")


def test_last_is_the_newest_release_not_newer_than_the_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    _with(monkeypatch, "\n".join([ONE, TWO, THREE]))
    assert releases.last("0.2.0").tag == "v0.2.0"
    assert releases.last("0.3.0.dev0").tag == "v0.2.1"
    with pytest.raises(releases.NoRelease):
        releases.last("0.0.9")


def test_a_release_resolves_to_its_commit_where_the_clone_has_no_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    first = releases.listed()[0]
    monkeypatch.setattr(releases, "_git", _without_tags(releases._git))
    assert releases.ref(first) == first.commit


def test_a_release_whose_commit_is_missing_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = releases.Release("v9.9.9", "0" * 40)
    with pytest.raises(releases.NoRelease, match=r"lacks v9\.9\.9"):
        releases.ref(missing)


def _without_tags(git: Git) -> Git:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        if args[:1] == ("rev-parse",):
            return git("rev-parse", "--verify", "--quiet", "refs/tags/no-such-tag")
        return git(*args)

    return run
