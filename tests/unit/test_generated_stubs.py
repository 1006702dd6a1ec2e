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
