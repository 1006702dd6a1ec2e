"""The one configuration precedence: flags > environment > file > default."""

from __future__ import annotations

from pathlib import Path

from gpufed.settings import Settings, csv, truthy


def test_a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default() -> None:
    s = Settings(file={"listen": "file:1", "ttl": "7"}, env={"GPUFED_LISTEN": "env:1"})
    assert s.get("flag:1", "GPUFED_LISTEN", "listen", "default:1") == "flag:1"
    assert s.get(None, "GPUFED_LISTEN", "listen", "default:1") == "env:1"
    assert Settings(file={"listen": "file:1"}, env={}).get(None, "GPUFED_LISTEN", "listen", "d") == "file:1"
    assert Settings(env={}).get(None, "GPUFED_LISTEN", "listen", "default:1") == "default:1"


def test_environment_and_file_values_take_the_defaults_type_or_a_converter() -> None:
    s = Settings(file={"ttl": "7", "on": "yes", "planes": ["a:1", " b:2 "]}, env={"GPUFED_N": "3"})
    assert s.get(None, "GPUFED_N", "n", 0) == 3
    assert s.get(None, "", "ttl", 0.0) == 7.0
    assert s.get(None, "", "on", False, truthy) is True
    no_planes: list[str] = []
    assert s.get(None, "", "planes", no_planes, csv) == ["a:1", "b:2"]
    assert csv("x, y,,z") == ["x", "y", "z"]


def test_a_file_is_read_as_toml_and_an_optional_missing_one_is_empty(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('endpoint = "127.0.0.1:9"\n')
    assert Settings.from_file(f).get(None, "", "endpoint", "") == "127.0.0.1:9"
    assert Settings.from_file(tmp_path / "none.toml", required=False).file == {}
