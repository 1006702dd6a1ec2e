"""The previous release, runnable beside this tree: a git worktree of its tag and a virtual
environment of its own, and its processes (replicas, daemons) on loopback.

The worktree and the environment are kept between runs (outside the repository, so no tool of
this tree reads the old sources), keyed by the tag.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from scripts import releases
from tests.harness import ADMIN_TOKEN, PEER_TOKEN, ROOMY_ENV, daemon_command, replica_command, wait_port

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(tempfile.gettempdir()) / f"gpufed-upgrade-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]}"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def previous_tag() -> str:
    """The newest release of an earlier minor release than this tree's (RELEASES)."""
    return releases.previous().tag


@dataclass(frozen=True)
class Release:
    tag: str
    tree: Path
    python: Path

    @property
    def version(self) -> str:
        return self.tag.removeprefix("v")


def _dependencies(pyproject: Path) -> list[str]:
    return sorted(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def checkout(tag: str) -> Release:
    """The tag's worktree and its own virtual environment. Its third-party packages are this
    tree's environment's when both pin the same dependencies (no network needed; the usual
    case between two releases), else they are installed into it with pip."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tree = CACHE / tag
    if not (tree / "pyproject.toml").exists():
        listed = {r.tag: r for r in releases.listed()}[tag]
        _git("worktree", "prune")
        _git("worktree", "add", "--detach", "--force", str(tree), releases.ref(listed))
    venv = CACHE / f"venv-{tag}"
    python = venv / "bin" / "python"
    if not python.exists():
        same = _dependencies(tree / "pyproject.toml") == _dependencies(ROOT / "pyproject.toml")
        subprocess.run(
            [sys.executable, "-m", "venv", *(["--without-pip"] if same else []), str(venv)], check=True
        )
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        # The old tree first; then (same pins) this environment's packages, without its .pth
        # files: this tree's editable install must not shadow the old one.
        lines = [str(tree)]
        if same:
            paths = sysconfig.get_paths()
            lines += sorted({paths["purelib"], paths["platlib"]})
        Path(site, "gpufed-previous-release.pth").write_text("\n".join(lines) + "\n")
        if not same:
            deps = _dependencies(tree / "pyproject.toml")
            subprocess.run([str(python), "-m", "pip", "install", "-q", *deps], check=True)
    return Release(tag, tree, python)


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **extra}


@contextlib.contextmanager
def process(
    args: list[str], cwd: Path, env: dict[str, str], log: Path, port: int = 0
) -> Iterator[subprocess.Popen[bytes]]:
    """A process of either release, its log in `log` (shown when it does not come up)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=_clean_env(env), stdout=subprocess.DEVNULL, stderr=out)
    try:
        if port:
            try:
                wait_port(port, 30)
            except Exception:
                sys.stderr.write(log.read_text(errors="replace")[-4000:])
                raise
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def replica_args(python: Path, endpoints: list[str], prefix: str, port: int, replica_id: str) -> list[str]:
    extra = ("--replica-id", replica_id, "--session-ttl", "3", "--report-interval", "0.5")
    return replica_command(endpoints, prefix, port, *extra, python=str(python))


REPLICA_ENV = {**ROOMY_ENV, "GPUFED_ADMIN_TOKEN": ADMIN_TOKEN, "GPUFED_PEER_TOKEN": PEER_TOKEN}


def daemon_args(python: Path, endpoints: list[str], provider: str, node_id: str, country: str) -> list[str]:
    return daemon_command(
        endpoints, provider, node_id, "--report-interval", "0.5", country=country, python=str(python)
    )
