"""Strings one party sends that another party's terminal shows: a provider's GPU model, region,
labels and health reasons, a hook's answer. They must hold no control characters (an escape
sequence in a GPU model would rewrite a developer's terminal or clipboard), no bidirectional or
invisible format characters (a name that reads as another, "Trojan Source"), no line or
paragraph separators. Free text (a hook's instructions) may break lines with \\n and \\t.
"""

from __future__ import annotations

import unicodedata

_REFUSED = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_MULTILINE_OK = frozenset("\n\t")


def printable(value: str, multiline: bool = False) -> bool:
    """Whether the string shows as itself on a terminal (ASCII text is checked at C speed)."""
    if value.isascii():
        if value.isprintable():
            return True
        return multiline and all(c.isprintable() or c in _MULTILINE_OK for c in value)
    return all(unicodedata.category(c) not in _REFUSED or (multiline and c in _MULTILINE_OK) for c in value)


def scrubbed(value: str) -> str:
    """The string with each refused character as U+FFFD: for text that must get through (a
    failed hook's last stderr line becomes a lease's end message)."""
    if printable(value):
        return value
    return "".join("\ufffd" if unicodedata.category(c) in _REFUSED else c for c in value)
