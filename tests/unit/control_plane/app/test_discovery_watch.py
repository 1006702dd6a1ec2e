"""WatchCapacity's queue is bounded where changes are added: a reader that stops reading costs
the replica at most WATCH_QUEUE_LIMIT queued changes, then its watch ends WATCH_TOO_SLOW."""

from __future__ import annotations

import asyncio

import pytest

from control_plane.adapters.index import Inventory
from control_plane.adapters.keyspace import Keyspace
from control_plane.app import discovery
from control_plane.domain.errors import Code, DomainError
from tests.unit.control_plane.inventory import P, add_node


def test_a_watch_whose_reader_stopped_reading_queues_at_most_the_limit_then_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(discovery, "WATCH_QUEUE_LIMIT", 5)

    async def go() -> None:
        inv = Inventory(Keyspace(P))
        add_node(inv, "neo", "n1", "DE", 2.0)
        d = discovery.Discovery(inv, asyncio.Event())
        stream = d.watch("")
        first = [await anext(stream), await anext(stream)]  # the node, then SNAPSHOT_END
        assert first[-1].type == first[-1].EVENT_TYPE_SNAPSHOT_END
        # The reader stops; the federation changes a thousand times meanwhile.
        for i in range(1000):
            add_node(inv, "neo", f"m{i}", "DE", 2.0, rev=10 + 2 * i)
        await asyncio.sleep(0)
        with pytest.raises(DomainError) as e:
            while True:
                await anext(stream)
        assert e.value.code is Code.RESOURCE_EXHAUSTED and e.value.reason == "WATCH_TOO_SLOW"

    asyncio.run(go())
