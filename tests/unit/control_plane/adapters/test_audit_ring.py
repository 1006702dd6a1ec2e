"""The audit ring keeps the newest events of gpufed.audit, bounded, paged newest first."""

from __future__ import annotations

import logging

from control_plane.adapters.audit_ring import MAX_VALUE_CHARS, AuditRing


def _record(event: dict[str, object]) -> logging.LogRecord:
    return logging.LogRecord("gpufed.audit", logging.INFO, __file__, 1, event, None, None)


def test_the_ring_keeps_the_newest_events_and_pages_them_newest_first() -> None:
    ring = AuditRing(size=5)
    for i in range(8):
        ring.emit(_record({"event": "privileged call", "principal": "admin:ops", "target": f"t{i}"}))
    page, more = ring.before(None, 3)
    assert [e.fields["target"] for e in page] == ["t7", "t6", "t5"] and more == page[-1].seq
    rest, more = ring.before(more, 3)
    assert [e.fields["target"] for e in rest] == ["t4", "t3"] and more is None  # t0..t2 dropped


def test_every_value_is_cut_and_other_fields_become_sorted_details() -> None:
    ring = AuditRing()
    ring.emit(
        _record(
            {
                "event": "quota set",
                "principal": "x" * 1000,
                "limits": {"max_gpus": 8},
                "b": 1,
                "level": "info",
            }
        )
    )
    (e,), _ = ring.before(None, 10)
    assert len(e.fields["principal"]) == MAX_VALUE_CHARS
    assert e.details == ("b=1", "limits={'max_gpus': 8}")  # the level is the log's, not the event's


def test_it_sees_what_the_audit_logger_logs_while_attached() -> None:
    ring = AuditRing().attach()
    try:
        logging.getLogger("gpufed.audit").info({"event": "denied", "code": "PERMISSION_DENIED"})
    finally:
        ring.detach()
    logging.getLogger("gpufed.audit").info({"event": "after"})
    assert [e.fields["event"] for e in ring.before(None, 10)[0]] == ["denied"]
