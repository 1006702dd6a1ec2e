"""The releases of gpufed, from the RELEASES file (tags do not travel with every clone), and
the git ref that names each one here: its tag where this clone has it, else its commit.

    python scripts/releases.py last      # the newest release not newer than this tree (buf breaking)
    python scripts/releases.py previous  # the newest of an earlier minor release (tests/upgrade)
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from the Makefile
    sys.path.insert(0, str(ROOT))

from control_plane.domain import versions  # noqa: E402
from gpufed import __version__  # noqa: E402

RELEASES = ROOT / "RELEASES"


class NoRelease(LookupError):
    """No release fits, or this clone lacks its commit (a shallow clone: fetch it)."""


@dataclass(frozen=True)
class Release:
    tag: str
    commit: str

    @property
    def version(self) -> versions.Release:
        v = versions.parse(self.tag.removeprefix("v"))
        assert v is not None, self.tag  # listed() admits only parseable tags
        return v


def listed(text: str | None = None) -> list[Release]:
    """The file's releases; a line that is not `vX.Y.Z <40 hex digits>` is an error, so a
    typo fails `make lint` instead of silently picking another release."""
    out = []
    raw = RELEASES.read_text() if text is None else text
    for n, line in enumerate(raw.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        ok = len(parts) == 2 and len(parts[1]) == 40 and all(c in "0123456789abcdef" for c in parts[1])
        if not ok or not parts[0].startswith("v") or versions.parse(parts[0][1:]) is None:
            raise ValueError(f"RELEASES line {n}: want 'vX.Y.Z <commit>', got {line!r}")
        out.append(Release(parts[0], parts[1]))
    return out


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def ref(release: Release) -> str:
    """The tag if this clone has it (and it names the listed commit), else the commit."""
    tagged = _git("rev-parse", "--verify", "--quiet", f"refs/tags/{release.tag}^{{commit}}").stdout.strip()
    if tagged:
        if tagged != release.commit:
            raise NoRelease(f"tag {release.tag} is {tagged}, RELEASES says {release.commit}")
        return release.tag
    if _git("cat-file", "-e", f"{release.commit}^{{commit}}").returncode != 0:
        _git("fetch", "--quiet", "origin", release.commit)  # a shallow clone; harmless if it fails
        if _git("cat-file", "-e", f"{release.commit}^{{commit}}").returncode != 0:
            raise NoRelease(f"this clone lacks {release.tag}'s commit {release.commit}: git fetch")
    return release.commit


def last(current: str = __version__) -> Release:
    """The newest release not newer than `current`'s (its own, once released)."""
    now = versions.release(current)
    fit = [r for r in listed() if r.version[:3] <= now[:3]]
    if not fit:
        raise NoRelease(f"no release up to {current} in {RELEASES}")
    return max(fit, key=lambda r: r.version)


def previous(current: str = __version__) -> Release:
    """The newest release of an earlier minor release than `current`'s."""
    now = versions.release(current)
    fit = [r for r in listed() if r.version[:2] < now[:2]]
    if not fit:
        raise NoRelease(f"no release before {current} in {RELEASES}")
    return max(fit, key=lambda r: r.version)


def main(argv: list[str]) -> int:
    which = {"last": last, "previous": previous}
    if len(argv) != 1 or argv[0] not in which:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(ref(which[argv[0]]()))
    except (NoRelease, ValueError) as e:
        print(f"releases: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
