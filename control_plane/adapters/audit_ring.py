"""The replica's recent audit events in memory: a logging handler on gpufed.audit that keeps the
last `size` events, for AdminService.ListAuditEvents (the console's audit tail). The log stays
the record; this is a window on it."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

AUDIT_LOGGER = "gpufed.audit"
RING_SIZE = 1000
MAX_VALUE_CHARS = 256
_NAMED = ("event", "principal", "method", "target", "code", "reason", "request_id")
_LEFT_OUT = frozenset({"level", "logger", "timestamp", "replica", *_NAMED})


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int  # increases by one per event this ring saw
    time_ns: int
    fields: Mapping[str, str]  # the named fields
    details: tuple[str, ...]  # "key=value" for the rest, in key order


def _cut(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text[:MAX_VALUE_CHARS]


class AuditRing(logging.Handler):
    def __init__(self, size: int = RING_SIZE) -> None:
        super().__init__(level=logging.INFO)
        self.entries: deque[AuditEntry] = deque(maxlen=size)
        self.seq = 0
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        event = record.msg if isinstance(record.msg, dict) else {"event": record.getMessage()}
        fields = {k: _cut(event[k]) for k in _NAMED if k in event and event[k] not in (None, "")}
        details = tuple(f"{k}={_cut(v)}" for k, v in sorted(event.items()) if k not in _LEFT_OUT)
        with self._lock:
            self.seq += 1
            self.entries.append(AuditEntry(self.seq, time.time_ns(), fields, details))

    def before(self, seq: int | None, limit: int) -> tuple[list[AuditEntry], int | None]:
        """Up to `limit` entries older than `seq` (None: the newest), newest first, and the
        seq to continue before (None: no more)."""
        with self._lock:
            snapshot = list(self.entries)
        older = [e for e in reversed(snapshot) if seq is None or e.seq < seq]
        page = older[:limit]
        return page, (page[-1].seq if len(older) > limit else None)

    def attach(self) -> AuditRing:
        logging.getLogger(AUDIT_LOGGER).addHandler(self)
        return self

    def detach(self) -> None:
        logging.getLogger(AUDIT_LOGGER).removeHandler(self)
