"""The CLI shows other parties' strings, never obeys them."""

from __future__ import annotations

import contextlib
import io

from gpufed.cli.leases import access_rows
from gpufed.cli.output import emit
from gpufed.terminal import escaped
from gpufed.v1 import lease_pb2


def test_escape_sequences_and_bidi_controls_are_printed_as_their_escapes() -> None:
    assert escaped("NVIDIA H100 80GB HBM3") == "NVIDIA H100 80GB HBM3"
    assert escaped("H100\x1b]52;c;ZXZpbA==\x07") == "H100\\x1b]52;c;ZXZpbA==\\x07"
    assert escaped("eu-\u202etsew") == "eu-\\u202etsew"
    assert escaped("Zürich \u00e9") == "Zürich \u00e9"  # letters stay letters
    assert escaped("a\u2028b\x9b") == "a\\u2028b\\x9b"


def test_a_lease_table_shows_a_hooks_escape_escaped() -> None:
    lease = lease_pb2.Lease(name="leases/00ff00ff00ff00ff", state=lease_pb2.LEASE_STATE_ACTIVE)
    lease.access_details.add(node="providers/p/nodes/n", ssh="ssh u@h", instructions="hi\x1b]0;owned\x07")

    class Args:
        output = "table"

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        emit(Args(), lease, lambda: access_rows(lease))  # type: ignore[arg-type]
    assert "\x1b" not in out.getvalue() and "\\x1b]0;owned\\x07" in out.getvalue()
