"""DiscoveryService: read-only answers from the replica's in-memory index, each with the revision
it reflects."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from control_plane import errors
from control_plane.domain import offers, pagination
from control_plane.domain.filters import compile_filter
from control_plane.domain.names import parse_node_name, valid_id
from control_plane.adapters.index import Change, Inventory
from gpufed.v1 import common_pb2, discovery_pb2, discovery_pb2_grpc

WATCH_QUEUE_LIMIT = 10_000
Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):
    def __init__(self, inventory: Inventory, shutdown: asyncio.Event, cache_size: int = 1024) -> None:
        self.inv = inventory
        self.shutdown = shutdown
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, discovery_pb2.SearchOffersResponse] = OrderedDict()

    async def SearchOffers(
        self, request: discovery_pb2.SearchOffersRequest, context: Ctx
    ) -> discovery_pb2.SearchOffersResponse:
        # Answers depend only on the request and the index revision (not on the caller), so the
        # same search at the same revision is answered once: popular searches polled by many
        # clients cost one evaluation per change of the federation.
        key = request.SerializeToString(deterministic=True)
        hit = self._cache.get(key)
        if hit is not None and hit.revision == self.inv.revision:
            self._cache.move_to_end(key)
            return hit
        resp = self._search(request)
        if self.cache_size:
            self._cache[key] = resp
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return resp

    def _search(self, request: discovery_pb2.SearchOffersRequest) -> discovery_pb2.SearchOffersResponse:
        flt = compile_filter(request.filter)
        if request.order_by == discovery_pb2.OFFER_ORDER_DISTANCE and flt.near is None:
            raise errors.invalid("NEAR_REQUIRED", "order_by DISTANCE needs filter.near")
        if request.order_by not in discovery_pb2.OfferOrder.values():
            raise errors.invalid("INVALID_ORDER", f"unknown order_by {request.order_by}")
        size = pagination.page_size(request.page_size)
        query = pagination.query_hash(flt.key(), str(request.min_free_gpus), str(request.order_by))
        start = pagination.decode_token(request.page_token, query)
        found, more = offers.search(self.inv, flt, request.min_free_gpus, request.order_by, start + size)
        page = found[start:]
        return discovery_pb2.SearchOffersResponse(
            offers=[offers.to_offer(c) for c in page],
            next_page_token=pagination.encode_token(query, start + size) if more else "",
            revision=self.inv.revision,
        )

    async def GetNode(
        self, request: discovery_pb2.GetNodeRequest, context: Ctx
    ) -> discovery_pb2.GetNodeResponse:
        parse_node_name(request.name)
        node = self.inv.view(request.name)
        if node is None:
            raise errors.not_found("NODE_NOT_FOUND", f"{request.name} is not registered", node=request.name)
        return discovery_pb2.GetNodeResponse(node=node, revision=self.inv.revision)

    async def ListNodes(
        self, request: discovery_pb2.ListNodesRequest, context: Ctx
    ) -> discovery_pb2.ListNodesResponse:
        if request.provider and not valid_id(request.provider):
            raise errors.invalid("INVALID_PROVIDER", f"{request.provider!r} is not a valid provider name")
        if request.state not in common_pb2.NodeState.values():
            raise errors.invalid("INVALID_STATE", f"unknown state {request.state}")
        size = pagination.page_size(request.page_size)
        query = pagination.query_hash("nodes", request.provider, str(request.state))
        names = [
            n
            for n, e in sorted(self.inv.nodes.items())
            if (not request.provider or e.node.provider == request.provider)
            and (not request.state or self.inv.state(n) == request.state)
        ]
        start, end, token = pagination.paginate(len(names), request.page_token, size, query)
        nodes = [v for n in names[start:end] if (v := self.inv.view(n)) is not None]
        return discovery_pb2.ListNodesResponse(nodes=nodes, next_page_token=token, revision=self.inv.revision)

    async def ListProviders(
        self, request: discovery_pb2.ListProvidersRequest, context: Ctx
    ) -> discovery_pb2.ListProvidersResponse:
        size = pagination.page_size(request.page_size)
        by: dict[str, discovery_pb2.Provider] = {}
        countries: dict[str, set[str]] = {}
        for name, entry in self.inv.nodes.items():
            p = entry.node.provider
            prov = by.get(p)
            if prov is None:
                prov = by[p] = discovery_pb2.Provider(name=f"providers/{p}", provider=p)
            prov.node_count += 1
            prov.gpu_count += len(entry.node.gpus)
            if self.inv.is_schedulable(name):
                prov.ready_node_count += 1
                view = self.inv.view(name)
                prov.free_gpu_count += view.free_gpu_count if view is not None else 0
            countries.setdefault(p, set()).add(entry.node.location.country_code)
        ordered = [by[p] for p in sorted(by)]
        for prov in ordered:
            prov.country_codes.extend(sorted(countries[prov.provider]))
        start, end, token = pagination.paginate(len(ordered), request.page_token, size, "providers")
        return discovery_pb2.ListProvidersResponse(
            providers=ordered[start:end], next_page_token=token, revision=self.inv.revision
        )

    async def SummarizeCapacity(
        self, request: discovery_pb2.SummarizeCapacityRequest, context: Ctx
    ) -> discovery_pb2.SummarizeCapacityResponse:
        flt = compile_filter(request.filter)
        buckets = offers.summarize(self.inv, flt)
        return discovery_pb2.SummarizeCapacityResponse(
            buckets=buckets,
            total_gpus=sum(b.total_gpus for b in buckets),
            free_gpus=sum(b.free_gpus for b in buckets),
            revision=self.inv.revision,
        )

    async def WatchCapacity(
        self, request: discovery_pb2.WatchCapacityRequest, context: Ctx
    ) -> AsyncIterator[discovery_pb2.WatchCapacityResponse]:
        if request.provider and not valid_id(request.provider):
            raise errors.invalid("INVALID_PROVIDER", f"{request.provider!r} is not a valid provider name")
        Event = discovery_pb2.WatchCapacityResponse
        queue: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue()

        def on_change(change: Change) -> None:
            if change.kind in ("node", "alive", "alloc") and (
                not request.provider or change.name.split("/")[1] == request.provider
            ):
                queue.put_nowait((change.name, change.revision))
            elif change.kind == "relist":
                queue.put_nowait(("", change.revision))

        unsubscribe = self.inv.subscribe(on_change)
        stop = asyncio.ensure_future(self.shutdown.wait())
        try:
            for name, _ in sorted(self.inv.nodes.items()):
                if request.provider and name.split("/")[1] != request.provider:
                    continue
                view = self.inv.view(name)
                if view is not None:
                    yield Event(type=Event.EVENT_TYPE_SNAPSHOT, node=view, revision=self.inv.revision)
            yield Event(type=Event.EVENT_TYPE_SNAPSHOT_END, revision=self.inv.revision)
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, stop}, return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    getter.cancel()
                    return
                if queue.qsize() > WATCH_QUEUE_LIMIT:
                    raise errors.ApiError(
                        grpc.StatusCode.ABORTED, "WATCH_TOO_SLOW", "the watcher fell too far behind"
                    )
                item = getter.result()
                if item is None:
                    return
                name, revision = item
                if not name:
                    continue
                view = self.inv.view(name)
                if view is None:
                    yield Event(
                        type=Event.EVENT_TYPE_NODE_REMOVED, node=common_pb2.Node(name=name), revision=revision
                    )
                else:
                    yield Event(type=Event.EVENT_TYPE_NODE_CHANGED, node=view, revision=revision)
        finally:
            unsubscribe()
            stop.cancel()
