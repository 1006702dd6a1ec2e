"""One configuration precedence for the replica, the daemon and the CLI:
flags > environment (GPUFED_*) > file (TOML) > default.

Each program declares its flags with `default=None` and asks `Settings.get` for every value, so
a flag given on the command line always wins, then the environment, then the file.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def truthy(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def csv(value: object) -> list[str]:
    """A list from a comma-separated string (environment) or a TOML array (file)."""
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


class Settings:
    def __init__(self, file: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> None:
        self.file = dict(file or {})
        self.env = os.environ if env is None else env

    @classmethod
    def from_file(cls, path: str | Path | None, required: bool = True) -> Settings:
        """Settings with the TOML file at `path` (none if empty; a missing optional file is none)."""
        if not path:
            return cls()
        p = Path(path)
        if not p.is_file() and not required:
            return cls()
        with p.open("rb") as f:
            return cls(tomllib.load(f))

    def get(
        self, flag: T | None, env: str, key: str, default: T, conv: Callable[[Any], T] | None = None
    ) -> T:
        """The flag if given, else $env, else the file's `key`, else `default`; environment
        and file values go through `conv` (default: the default's type)."""
        if flag is not None:
            return flag
        convert: Callable[[Any], T] = conv or (lambda v: type(default)(v))  # type: ignore[call-arg]
        if env and env in self.env:
            return convert(self.env[env])
        if key and key in self.file:
            return convert(self.file[key])
        return default
