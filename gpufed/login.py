"""The login command of a lease, built on the developer's machine from what the provider's hook
answered (AccessDetails.ssh).

That answer comes from a party the developer does not trust, so it is never run as given: an
`ssh -o ProxyCommand=...` or `-o LocalCommand=...` would run the provider's code on the
developer's machine. It is parsed as `ssh [-p PORT] [-l USER] [USER@]HOST` and nothing else,
each part checked, and the command is built anew from those parts, the developer's own key and
options.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[?[0-9A-Fa-f:.]{2,45}\]?")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")


@dataclass(frozen=True)
class Login:
    user: str
    host: str
    port: int

    def argv(self, key: str = "", options: Sequence[str] = (), command: Sequence[str] = ()) -> list[str]:
        """`ssh` with the developer's key (else ssh's default ones) and `-o` options."""
        out = ["ssh"]
        if key:
            out += ["-i", key]
        for o in options:
            out += ["-o", o]
        if self.port != 22:
            out += ["-p", str(self.port)]
        out.append(f"{self.user}@{self.host}" if self.user else self.host)
        if command:
            out += ["--", *command]
        return out


def parse_ssh(text: str) -> Login:
    """The provider's `ssh ...` answer as a Login; ValueError for anything else."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"the provider's ssh command does not parse: {e}") from None
    if not words or words[0] != "ssh":
        raise ValueError("the provider's access is not an ssh command")
    user, port, target = "", 22, ""
    rest = words[1:]
    while rest:
        w = rest.pop(0)
        if w in ("-p", "-l") and rest:
            value = rest.pop(0)
            if w == "-p":
                if not value.isdigit() or not 0 < int(value) < 65536:
                    raise ValueError(f"the provider's ssh port {value[:20]!r} is not a port")
                port = int(value)
            else:
                user = value
        elif w.startswith("-"):
            raise ValueError(f"the provider's ssh command has option {w[:20]!r}: only -p and -l are taken")
        elif target:
            raise ValueError("the provider's ssh command has more than a destination (a remote command?)")
        else:
            target = w
    if not target:
        raise ValueError("the provider's ssh command names no host")
    if "@" in target:
        user, _, host = target.rpartition("@")
    else:
        host = target
    if user and not _USER.fullmatch(user):
        raise ValueError(f"the provider's ssh user {user[:40]!r} is not a plain user name")
    if not _HOST.fullmatch(host):
        raise ValueError(f"the provider's ssh host {host[:60]!r} is not a host name or address")
    return Login(user, host.strip("[]"), port)
