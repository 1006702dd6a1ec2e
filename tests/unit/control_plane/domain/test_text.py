"""What a provider or a hook may send that others' terminals show."""

from __future__ import annotations

from control_plane.domain.text import printable, scrubbed


def test_text_with_controls_bidi_or_separators_is_not_printable() -> None:
    assert printable("NVIDIA H100 80GB HBM3") and printable("Zürich") and printable("")
    for bad in (
        "a\x1bb",
        "a\x07",
        "a\x7f",
        "a\x9bb",
        "eu-\u202etsew",
        "a\u200bb",
        "a\u2028b",
        "a\nb",
        "\ud800",
    ):
        assert not printable(bad), repr(bad)


def test_free_text_may_break_lines_but_nothing_else() -> None:
    assert printable("line one\nline\ttwo", multiline=True)
    assert not printable("one\n\x1b[2J", multiline=True)
    assert not printable("one\r\nboth", multiline=True)  # \r rewrites the line it ends


def test_scrubbed_keeps_the_text_and_replaces_what_would_act() -> None:
    assert scrubbed("plain") == "plain"
    assert scrubbed("no GPU\x1b[2J\u202e") == "no GPU\ufffd[2J\ufffd"
