"""What the CLI prints of other parties' strings: shown, never obeyed. A provider's GPU model or
a hook's instructions may carry an escape sequence (rewriting the developer's terminal, title or
clipboard) or bidirectional controls (text that reads as other text): each such character is
printed as its escape, \\x1b or \\u202e, instead."""

from __future__ import annotations

import unicodedata

_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def escaped(value: str) -> str:
    if value.isascii() and value.isprintable():
        return value
    out = []
    for c in value:
        if unicodedata.category(c) in _HIDDEN:
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)
