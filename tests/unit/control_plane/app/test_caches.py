"""The bounded cache: least recently used out first, within entries and bytes."""

from __future__ import annotations

from control_plane.app.caches import BoundedCache


def test_the_least_recently_used_goes_first_when_entries_run_out() -> None:
    c: BoundedCache[str, int] = BoundedCache(max_entries=2, max_bytes=1000)
    c.put("a", 1, 10)
    c.put("b", 2, 10)
    assert c.get("a") == 1  # a is now the most recent
    c.put("c", 3, 10)
    assert (c.get("a"), c.get("b"), c.get("c")) == (1, None, 3)


def test_bytes_bound_the_cache_whatever_the_entries() -> None:
    c: BoundedCache[str, int] = BoundedCache(max_entries=100, max_bytes=100)
    for i in range(10):
        c.put(str(i), i, 30)
    assert len(c) == 3 and c.bytes == 90
    c.put("huge", 0, 101)  # larger than the bound: not kept, nothing else lost
    assert c.get("huge") is None and len(c) == 3
    c.put("9", 9, 10)  # replacing an entry counts its new size only
    assert c.bytes == 70
