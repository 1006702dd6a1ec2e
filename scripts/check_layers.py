"""The layering check of `make lint`: every import, at any depth of a module, follows the layers
of docs/architecture.md. Exit 1 with one line per violation.

    servicers -> application -> domain (pure) ; application -> adapters -> domain
    node_daemon imports nothing of control_plane; the SDK and CLI (gpufed) nothing of either.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Rule:
    under: str  # a package path, relative to the root
    forbidden: tuple[str, ...] = ()  # module prefixes it may not import
    only: tuple[str, ...] | None = None  # if set: the only non-stdlib prefixes it may import
    why: str = ""


RULES = (
    Rule(
        "control_plane/domain",
        only=("control_plane.domain", "gpufed.v1", "google.protobuf"),
        why="the domain is pure: the standard library, gpufed.v1 messages and itself",
    ),
    Rule(
        "control_plane/adapters",
        forbidden=("control_plane.app", "control_plane.servicers", "control_plane.rpc"),
        why="adapters serve the application; they do not call up into it",
    ),
    Rule(
        "control_plane/app",
        forbidden=("control_plane.servicers", "control_plane.rpc", "control_plane.errors", "grpc"),
        why="the application knows nothing of gRPC or the servicers (it raises domain errors)",
    ),
    Rule(
        "control_plane/servicers",
        forbidden=("control_plane.adapters", "etcd3"),
        why="servicers authorize, parse, call the application and map; no store, no index",
    ),
    Rule(
        "control_plane/console",
        forbidden=(
            "control_plane.app",
            "control_plane.adapters",
            "control_plane.servicers",
            "control_plane.domain",
            "control_plane.rpc",
            "etcd3",
        ),
        why="the console is a gateway: it reaches the federation only through the gRPC API (the SDK)",
    ),
    Rule("node_daemon", forbidden=("control_plane",), why="the daemon shares only gpufed with the server"),
    Rule(
        "gpufed",
        forbidden=("control_plane", "node_daemon"),
        why="the SDK and CLI import only gpufed.v1 and themselves",
    ),
)

STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}


def _module_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_of(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            yield node.lineno, mod
            for alias in node.names:  # `from a import b` may import module a.b
                yield node.lineno, f"{mod}.{alias.name}"


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(root: Path = ROOT) -> Iterator[str]:
    for rule in RULES:
        base = root / rule.under
        if not base.exists():
            continue
        for path in sorted(base.rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            seen: set[int] = set()  # one report per import statement
            for line, mod in imports(path, root):
                top = mod.split(".")[0]
                bad = any(_matches(mod, f) for f in rule.forbidden)
                if rule.only is not None and top not in STDLIB:
                    bad = bad or not any(_matches(mod, o) for o in rule.only)
                    # `from gpufed.v1 import common_pb2` also yields gpufed.v1.common_pb2: fine;
                    # `from control_plane import domain` yields control_plane: judged by its names.
                    if mod in ("control_plane", "gpufed", "google"):
                        bad = False
                if bad and line not in seen:
                    seen.add(line)
                    yield f"{path.relative_to(root)}:{line}: imports {mod}: {rule.why}"


def main() -> int:
    found = list(violations())
    for v in found:
        print(v)
    if found:
        print(f"{len(found)} layering violation(s); see docs/architecture.md (Layers)")
        return 1
    print("layers: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
