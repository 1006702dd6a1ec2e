"""Discovery: read-only answers from the replica's in-memory index, each with the revision it
reflects, and the capacity watch."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable

from control_plane.adapters.index import Change, ChangeKind, Inventory
from control_plane.app.caches import BoundedCache
from control_plane.domain import calendar, errors, offers, pagination, pools, registration, reservation_rules
from control_plane.domain.errors import shown
from control_plane.domain.filters import compile_filter, visible
from control_plane.domain.inventory import Candidate
from control_plane.domain.names import parse_node_name, valid_id
from gpufed.clock import SYSTEM, Clock
from gpufed.v1 import common_pb2, discovery_pb2

WATCH_QUEUE_LIMIT = 10_000
OFFER_CACHE_SIZE = 65_536
# Bytes the caches may hold whatever the requests: answers are pages of up to 1,000 offers.
ANSWER_CACHE_BYTES = 64 << 20
OFFER_CACHE_BYTES = 64 << 20
WatchEvent = discovery_pb2.WatchCapacityResponse


class Discovery:
    def __init__(
        self,
        inventory: Inventory,
        shutdown: asyncio.Event,
        cache_size: int = 1024,
        read_budget: Callable[[str], None] | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self.inv = inventory
        self.clock = clock
        # A tenant's budget of whole-index reads (Quotas.take_read): RATE_LIMITED past it.
        self.read_budget = read_budget
        self.shutdown = shutdown
        self.cache_size = cache_size
        self._answers: BoundedCache[bytes, discovery_pb2.SearchOffersResponse] = BoundedCache(
            cache_size, ANSWER_CACHE_BYTES
        )
        # Offers by (node, node record revision, GPUs): what an offer holds follows from these,
        # so under lease churn only the node that changed builds its offer again.
        self._offers: BoundedCache[tuple[str, int, tuple[str, ...]], discovery_pb2.Offer] = BoundedCache(
            OFFER_CACHE_SIZE, OFFER_CACHE_BYTES
        )

    def search(
        self, request: discovery_pb2.SearchOffersRequest, viewer: str | None = ""
    ) -> discovery_pb2.SearchOffersResponse:
        # Answers depend only on the request, whose private pool the caller sees and the index
        # revision, so the same search at the same revision is answered once: popular searches
        # polled by many clients cost one evaluation per change of the federation. Callers
        # without a pool of their own share one view.
        personal = viewer is None or viewer in self.inv.pools or viewer in self.inv.burst
        scope = viewer if personal else ""
        key = (
            request.SerializeToString(deterministic=True)
            + b"\x00"
            + (b"*" if scope is None else scope.encode())
        )
        windowed = request.HasField("available_for") or request.HasField("available_from")
        hit = None if windowed else self._answers.get(key)
        if hit is not None and hit.revision == self.inv.revision:
            return hit
        resp = self._search(request, scope)
        if self.cache_size and not windowed:  # a window's answer moves with the time too
            self._answers.put(key, resp, len(key) + resp.ByteSize())
        return resp

    def _search(
        self, request: discovery_pb2.SearchOffersRequest, viewer: str | None
    ) -> discovery_pb2.SearchOffersResponse:
        flt = dataclasses.replace(compile_filter(request.filter), viewer=viewer)
        if request.order_by == discovery_pb2.OFFER_ORDER_DISTANCE and flt.near is None:
            raise errors.invalid("NEAR_REQUIRED", "order_by DISTANCE needs filter.near", field="order_by")
        if request.order_by not in discovery_pb2.OfferOrder.values():
            raise errors.invalid("INVALID_ORDER", f"unknown order_by {request.order_by}", field="order_by")
        pools.validate_choice(request.pool)
        size = pagination.page_size(request.page_size)
        query = pagination.query_hash(
            flt.key(), str(request.min_free_gpus), str(request.order_by), str(request.pool)
        )
        window = reservation_rules.search_window(
            request.available_from if request.HasField("available_from") else None,
            request.available_for if request.HasField("available_for") else None,
            self.clock.time_ns(),
        )
        if window is not None:
            query = pagination.query_hash(query, str(window))
        start = pagination.decode_token(request.page_token, query)
        # OWN_FIRST: the pool's offers, then the federation's, each in the requested order.
        found: list[Candidate] = []
        more = False
        if viewer is None:
            filters = [flt]  # an operator: every pool, no burst policy
        else:
            burst = pools.from_json(self.inv.burst.get(viewer))[0]
            scopes = pools.stages(request.pool, viewer in self.inv.pools)
            filters = [f for scope in scopes for f in pools.scoped(flt, scope, burst)]
        for f in filters:
            need = start + size - len(found)
            if window is None:
                got, more = offers.search(self.inv, f, request.min_free_gpus, request.order_by, need)
            else:
                got, more = calendar.window_search(
                    self.inv, f, *window, self.inv.slots, self.inv.held_until, request.min_free_gpus,
                    request.order_by, need,
                )  # fmt: skip
            found += got
            if len(found) >= start + size:
                more = True
                break
        return discovery_pb2.SearchOffersResponse(
            offers=[self._offer(c) for c in found[start:]],
            next_page_token=pagination.encode_token(query, start + size) if more else "",
            revision=self.inv.revision,
        )

    def _offer(self, c: Candidate) -> discovery_pb2.Offer:
        key = (c.name, c.mod_revision, tuple(g.uuid for g in c.gpus))
        offer = self._offers.get(key)
        if offer is None:
            offer = offers.base_offer(c)
            self._offers.put(key, offer, offer.ByteSize() + 64 * len(key[2]) + 100)
        if c.distance_km is None:
            return offer
        near = discovery_pb2.Offer()
        near.CopyFrom(offer)
        near.distance_km = round(c.distance_km, 3)
        return near

    def _view(self, name: str, tenant: str | None) -> common_pb2.Node | None:
        """The node as `tenant` may see it: which lease holds a GPU only for its own leases
        (None: an operator, who sees all)."""
        node = self.inv.view(name)
        if node is None or not visible(node, tenant):
            return None
        if tenant is None:
            return node
        for gpu in node.gpus:
            if gpu.lease:
                lease = self.inv.leases.get(gpu.lease.split("/", 1)[1])
                if lease is None or lease.tenant != tenant:
                    gpu.lease = ""
        return node

    def node(self, name: str, tenant: str | None = None, provider: str | None = None) -> common_pb2.Node:
        """`provider`: a provider's own view, its own nodes only (another's is NOT_FOUND)."""
        parse_node_name(name)
        node = self._view(name, tenant)
        if node is None or (provider is not None and node.provider != provider):
            raise errors.not_found("NODE_NOT_FOUND", f"{name} is not registered", node=name)
        return node

    def list_nodes(
        self, request: discovery_pb2.ListNodesRequest, tenant: str | None = None, provider: str | None = None
    ) -> tuple[list[common_pb2.Node], str]:
        """`provider`: a provider's own view: its own nodes only, whatever `request.provider` names."""
        if request.provider and not valid_id(request.provider):
            raise errors.invalid(
                "INVALID_PROVIDER",
                f"{shown(request.provider)} is not a valid provider name",
                field="provider",
            )
        if request.state not in common_pb2.NodeState.values():
            raise errors.invalid("INVALID_STATE", f"unknown state {request.state}", field="state")
        size = pagination.page_size(request.page_size)
        query = pagination.query_hash(
            "nodes", request.provider, str(request.state), str(tenant), str(provider)
        )
        names = [
            n
            for n, e in sorted(self.inv.nodes.items())
            if (not request.provider or e.node.provider == request.provider)
            and (provider is None or e.node.provider == provider)
            and (not request.state or self.inv.state(n) == request.state)
            and visible(e.node, tenant)
        ]
        start, end, token = pagination.paginate(len(names), request.page_token, size, query)
        return [v for n in names[start:end] if (v := self._view(n, tenant)) is not None], token

    def list_providers(
        self, page_size: int, page_token: str, tenant: str | None = ""
    ) -> tuple[list[discovery_pb2.Provider], str]:
        size = pagination.page_size(page_size)
        by: dict[str, discovery_pb2.Provider] = {}
        countries: dict[str, set[str]] = {}
        for name, entry in self.inv.nodes.items():
            if not visible(entry.node, tenant):
                continue  # another tenant's pool: not in any count
            p = entry.node.provider
            prov = by.get(p)
            if prov is None:
                prov = by[p] = discovery_pb2.Provider(name=f"providers/{p}", provider=p)
            prov.node_count += 1
            prov.gpu_count += registration.whole_gpus(entry.node.gpus)
            if self.inv.is_schedulable(name):
                prov.ready_node_count += 1
                view = self.inv.view(name)
                prov.free_gpu_count += view.free_gpu_count if view is not None else 0
            countries.setdefault(p, set()).add(entry.node.location.country_code)
        ordered = [by[p] for p in sorted(by)]
        for prov in ordered:
            prov.country_codes.extend(sorted(countries[prov.provider]))
        start, end, token = pagination.paginate(len(ordered), page_token, size, f"providers/{tenant}")
        return ordered[start:end], token

    def take_read(self, tenant: str | None) -> None:
        """Charge a list or summary call to its tenant (operators are not metered)."""
        if tenant is not None and self.read_budget is not None:
            self.read_budget(tenant)

    def summarize(
        self, request: discovery_pb2.SummarizeCapacityRequest, viewer: str | None = ""
    ) -> discovery_pb2.SummarizeCapacityResponse:
        flt = dataclasses.replace(compile_filter(request.filter), viewer=viewer)
        window = reservation_rules.search_window(
            request.available_from if request.HasField("available_from") else None,
            request.available_for if request.HasField("available_for") else None,
            self.clock.time_ns(),
        )
        if window is None:
            buckets = offers.summarize(self.inv, flt)
        else:
            inv = self.inv
            tally = calendar.window_totals(
                inv,
                flt,
                *window,
                inv.slots,
                inv.held_until,
                lambda n: n not in inv.calendars and n not in inv.allocs,
            )
            buckets = offers.to_buckets(tally)
        return discovery_pb2.SummarizeCapacityResponse(
            buckets=buckets,
            total_gpus=sum(b.total_gpus for b in buckets),
            free_gpus=sum(b.free_gpus for b in buckets),
            revision=self.inv.revision,
        )

    async def watch(self, provider: str, tenant: str | None = None) -> AsyncIterator[WatchEvent]:
        """A snapshot (SNAPSHOT per node, then SNAPSHOT_END), then one event per node change.
        After a re-list of the index (a compacted watch) a fresh snapshot follows: changes in
        the gap were never seen, so the subscriber replaces its view."""
        if provider and not valid_id(provider):
            raise errors.invalid(
                "INVALID_PROVIDER",
                f"{shown(provider)} is not a valid provider name",
                field="filter.providers",
            )
        queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        overflow = False  # bounded where items are added: a reader that stops reading costs no more

        shown_names: set[str] = set()  # what the subscriber holds: a removal names only these

        def on_change(change: Change) -> None:
            nonlocal overflow
            if queue.qsize() >= WATCH_QUEUE_LIMIT:
                overflow = True
                return
            if change.kind in (ChangeKind.NODE, ChangeKind.ALIVE, ChangeKind.ALLOC) and (
                not provider or change.name.split("/")[1] == provider
            ):
                queue.put_nowait((change.name, change.revision))
            elif change.kind is ChangeKind.RESYNC:
                queue.put_nowait(("", change.revision))

        unsubscribe = self.inv.subscribe(on_change)
        stop = asyncio.ensure_future(self.shutdown.wait())
        try:
            for ev in self._snapshot(provider, tenant):
                shown_names.add(ev.node.name)
                yield ev
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, stop}, return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    getter.cancel()
                    raise _going_away()
                if overflow:
                    raise errors.exhausted(
                        "WATCH_TOO_SLOW",
                        f"the watcher fell {WATCH_QUEUE_LIMIT} changes behind; watch again (fresh snapshot)",
                    )
                name, revision = getter.result()
                if not name:
                    while not queue.empty():  # the snapshot covers whatever queued before it
                        queue.get_nowait()
                    shown_names.clear()
                    for ev in self._snapshot(provider, tenant):
                        shown_names.add(ev.node.name)
                        yield ev
                    continue
                view = self._view(name, tenant)
                if view is None:
                    if name not in shown_names:
                        continue  # never shown (another tenant's pool): nothing to remove
                    shown_names.discard(name)
                    yield WatchEvent(
                        type=WatchEvent.EVENT_TYPE_NODE_REMOVED,
                        node=common_pb2.Node(name=name),
                        revision=revision,
                    )
                else:
                    shown_names.add(name)
                    yield WatchEvent(type=WatchEvent.EVENT_TYPE_NODE_CHANGED, node=view, revision=revision)
        finally:
            unsubscribe()
            stop.cancel()

    def _snapshot(self, provider: str, tenant: str | None) -> list[WatchEvent]:
        out = []
        for name, _ in sorted(self.inv.nodes.items()):
            if provider and name.split("/")[1] != provider:
                continue
            view = self._view(name, tenant)
            if view is not None:
                out.append(
                    WatchEvent(type=WatchEvent.EVENT_TYPE_SNAPSHOT, node=view, revision=self.inv.revision)
                )
        out.append(WatchEvent(type=WatchEvent.EVENT_TYPE_SNAPSHOT_END, revision=self.inv.revision))
        return out


def _going_away() -> errors.DomainError:
    """How a watch ends when its replica shuts down: UNAVAILABLE, so clients watch again on
    another replica (the SDK does), starting from a fresh snapshot."""
    return errors.unavailable("REPLICA_SHUTTING_DOWN", "this replica is shutting down; watch again")
