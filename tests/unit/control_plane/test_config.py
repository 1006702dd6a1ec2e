"""Replica configuration: each flag with its GPUFED_* variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.config import parse_args


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ("GPUFED_LISTEN", "GPUFED_ETCD_ENDPOINTS", "GPUFED_ETCD_PREFIX"):
        monkeypatch.delenv(v, raising=False)
    cfg = parse_args([])
    assert cfg.listen == "127.0.0.1:50051"
    assert cfg.etcd_endpoints == ["127.0.0.1:2379"]
    assert cfg.etcd_prefix == "/gpufed"


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFED_LISTEN", "127.0.0.1:6000")
    monkeypatch.setenv("GPUFED_ETCD_ENDPOINTS", "10.0.0.1:2379, 10.0.0.2:2379")
    monkeypatch.setenv("GPUFED_ETCD_PREFIX", "/fed-a")
    monkeypatch.setenv("GPUFED_ADMIN_TOKEN", "boot")
    cfg = parse_args([])
    assert cfg.listen == "127.0.0.1:6000"
    assert cfg.etcd_endpoints == ["10.0.0.1:2379", "10.0.0.2:2379"]
    assert cfg.etcd_prefix == "/fed-a" and cfg.admin_token == "boot" and cfg.peer_token == ""
    cfg = parse_args(
        ["--listen", "127.0.0.1:7000", "--etcd-prefix", "/fed-b", "--etcd-endpoints", "127.0.0.1:1"]
    )
    assert (cfg.listen, cfg.etcd_prefix, cfg.etcd_endpoints) == ("127.0.0.1:7000", "/fed-b", ["127.0.0.1:1"])


def test_a_config_file_is_below_environment_and_flags(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for v in ("GPUFED_LISTEN", "GPUFED_ETCD_ENDPOINTS", "GPUFED_ETCD_PREFIX", "GPUFED_CONFIG_FILE"):
        monkeypatch.delenv(v, raising=False)
    f = tmp_path / "replica.toml"
    f.write_text(
        'listen = "127.0.0.1:6100"\netcd_endpoints = ["127.0.0.1:1", "127.0.0.1:2"]\netcd_prefix = "/f"\n'
    )
    cfg = parse_args(["--config", str(f)])
    assert (cfg.listen, cfg.etcd_endpoints, cfg.etcd_prefix) == (
        "127.0.0.1:6100",
        ["127.0.0.1:1", "127.0.0.1:2"],
        "/f",
    )
    monkeypatch.setenv("GPUFED_ETCD_PREFIX", "/env")
    cfg = parse_args(["--config", str(f), "--listen", "127.0.0.1:6200"])
    assert (cfg.listen, cfg.etcd_prefix) == ("127.0.0.1:6200", "/env")
