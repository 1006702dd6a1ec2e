"""The committed stubs are exactly what `make proto` generates from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "gpufed" / "v1").glob("*_pb2*")}
    committed = {p.name: p.read_bytes() for p in (ROOT / "gpufed" / "v1").glob("*_pb2*")}
    assert fresh.keys() == committed.keys(), "run `make proto`: stub files differ"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"run `make proto`: stale stubs {stale}"


def test_dependency_lower_bounds_are_what_the_committed_stubs_need() -> None:
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0]: d for d in project["dependencies"]}
    pb2 = (ROOT / "gpufed" / "v1" / "common_pb2.py").read_text()
    grpc_stub = (ROOT / "gpufed" / "v1" / "lease_pb2_grpc.py").read_text()
    protobuf_gen = re.search(r"# Protobuf Python Version: (\S+)", pb2)
    grpc_gen = re.search(r"GRPC_GENERATED_VERSION = '(\S+)'", grpc_stub)
    assert protobuf_gen and grpc_gen
    assert f">={protobuf_gen.group(1)}" in deps["protobuf"]
    assert deps["grpcio"] == f"grpcio>={grpc_gen.group(1)}"
    dev = project["optional-dependencies"]["dev"]
    assert f"grpcio-tools=={grpc_gen.group(1)}" in dev, "the generator is pinned to the stubs' version"
    assert not any(d.startswith("grpcio-tools") for d in project["dependencies"]), "not needed at run time"
