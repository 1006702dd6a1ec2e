"""Daemon configuration: flags win over GPUFED_* variables, which win over the TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_daemon.config import parse_args


def test_toml_file_env_and_flags_in_order_of_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "daemon.toml"
    f.write_text(
        'control_planes = ["a:1", "b:2"]\nprovider = "neo"\ncountry = "fr"\nregion = "eu-west"\n'
        'price_per_gpu_hour = 1.5\nreport_interval = 5\n[labels]\ntier = "premium"\n'
    )
    for var in ("GPUFED_PROVIDER", "GPUFED_COUNTRY", "GPUFED_REGION", "GPUFED_CONTROL_PLANES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GPUFED_REGION", "eu-north")
    monkeypatch.setenv("GPUFED_TOKEN", "gpf_x_y")
    cfg = parse_args(
        ["--config", str(f), "--price-per-gpu-hour", "2.25", "--label", "disk=nvme", "--node-id", "n1"]
    )
    assert cfg.control_planes == ["a:1", "b:2"]
    assert cfg.provider == "neo" and cfg.country == "FR"
    assert cfg.region == "eu-north"  # environment over file
    assert cfg.price_per_gpu_hour == 2.25  # flag over file
    assert cfg.report_interval == 5.0
    assert cfg.labels == {"tier": "premium", "disk": "nvme"}
    assert cfg.token == "gpf_x_y" and cfg.node_id == "n1"


def test_repeatable_control_planes_and_fake_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUFED_CONTROL_PLANES", raising=False)
    cfg = parse_args(
        [
            "--provider",
            "neo",
            "--country",
            "DE",
            "--control-plane",
            "x:1",
            "--control-plane",
            "y:2",
            "--fake-nvml",
            "h100-sxm-8",
            "--fake-event",
            "30s:gpu3:xid=79",
        ]
    )
    assert cfg.control_planes == ["x:1", "y:2"]
    assert cfg.fake_nvml == "h100-sxm-8" and cfg.fake_events == ["30s:gpu3:xid=79"]
    assert cfg.node_id  # the hostname by default


def test_provider_and_country_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUFED_PROVIDER", raising=False)
    monkeypatch.delenv("GPUFED_COUNTRY", raising=False)
    with pytest.raises(SystemExit):
        parse_args(["--country", "DE"])
    with pytest.raises(SystemExit):
        parse_args(["--provider", "neo"])


def test_metrics_label_the_host_hostname_unless_told_the_legacy_hostname(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GPUFED_METRICS_HOSTNAME_LABEL", raising=False)
    base = ["--provider", "neo", "--country", "DE"]
    assert parse_args(base).metrics_hostname_label == "hostname"
    assert parse_args([*base, "--metrics-hostname-label", "Hostname"]).metrics_hostname_label == "Hostname"
    with pytest.raises(SystemExit):
        parse_args([*base, "--metrics-hostname-label", "HOSTNAME"])
    f = tmp_path / "daemon.toml"
    f.write_text('metrics_hostname_label = "host"\n')
    with pytest.raises(SystemExit):  # a file's value is checked as the flag's is
        parse_args([*base, "--config", str(f)])
