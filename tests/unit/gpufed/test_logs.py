"""The one logging configuration of every gpufed process: JSON lines unless stderr is a terminal,
console lines in one, and the per-RPC fields (request id, method) in every line of a call."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

_PROBE = """
from gpufed.logs import bind_rpc, configure_logging, get_logger
configure_logging()
log = get_logger("probe")
log.info("outside", answer=42)
bind_rpc({"request_id": "req-7", "method": "LeaseService.CreateLease"})
log.warning("inside")
bind_rpc(None)
log.info("after")
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFED_LOG")}
    return {**env, "GPUFED_LOG_LEVEL": "INFO"}


def test_logs_are_json_lines_with_the_rpc_fields_when_stderr_is_not_a_terminal() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], env=_env(), capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert [e["event"] for e in lines] == ["outside", "inside", "after"]
    outside, inside, after = lines
    assert outside["answer"] == 42 and outside["level"] == "info" and outside["logger"] == "probe"
    assert "timestamp" in outside and "request_id" not in outside
    assert inside["request_id"] == "req-7" and inside["method"] == "LeaseService.CreateLease"
    assert "request_id" not in after


def test_logs_are_console_lines_in_a_terminal() -> None:
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-c", _PROBE], env=_env(), stderr=terminal)
        os.close(terminal)
        out = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal's other end closed: the probe exited
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(60) == 0
    finally:
        os.close(controller)
    text = out.decode(errors="replace")
    lines = [line for line in text.splitlines() if "outside" in line or "inside" in line]
    assert len(lines) == 2, text
    assert not any(line.lstrip().startswith("{") for line in lines)
    assert "answer" in lines[0] and "42" in lines[0]
    assert "req-7" in lines[1]
