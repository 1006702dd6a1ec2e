"""The layering check of `make lint` fails on every kind of violation and passes the tree."""

from __future__ import annotations

from pathlib import Path

from scripts.check_layers import violations


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_repository_follows_its_layers() -> None:
    assert list(violations()) == []


def test_a_domain_module_importing_grpc_the_store_or_the_index_is_reported(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "control_plane/domain/a.py": "import grpc\nfrom control_plane.adapters import store\n",
            "control_plane/domain/b.py": "def f():\n    from control_plane.adapters.index import Inventory\n",
            "control_plane/domain/ok.py": "import json\nfrom gpufed.v1 import common_pb2\nfrom . import a\n",
        },
    )
    found = list(violations(root))
    assert len(found) == 3 and all("domain" in v for v in found)
    assert any("a.py:1" in v for v in found) and any("b.py:2" in v for v in found)


def test_daemon_sdk_and_servicers_are_kept_apart(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "node_daemon/x.py": "from control_plane.domain import health\n",
            "gpufed/cli/main.py": "import node_daemon.collector\n",
            "control_plane/servicers/s.py": "from control_plane.adapters.store import EtcdStore\n",
            "control_plane/app/a.py": "from control_plane.servicers import s\n",
        },
    )
    assert len(list(violations(root))) == 4
