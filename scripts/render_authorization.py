"""Write the authorization table (control_plane/authorization.py) into docs/api.md, between its
markers, so the docs cannot drift from what the replica enforces. `--check` fails if stale."""

from __future__ import annotations

import sys
from pathlib import Path

from control_plane.authorization import render_markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
BEGIN = "<!-- authorization table: scripts/render_authorization.py -->\n"
END = "<!-- end of the authorization table -->\n"


def rendered(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + BEGIN + render_markdown() + END + tail


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        print(f"{DOC}: markers missing", file=sys.stderr)
        return 1
    new = rendered(text)
    if "--check" in argv:
        if new != text:
            print(f"{DOC} is stale: run python scripts/render_authorization.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
