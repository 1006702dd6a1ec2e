"""DiscoveryService (control_plane.app.discovery does the work)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from control_plane import auth
from control_plane.app.discovery import Discovery
from gpufed import __version__
from gpufed.v1 import discovery_pb2, discovery_pb2_grpc

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _tenant() -> str | None:
    """The tenant whose view this is (its own leases, its own private pool); None for an
    operator, who sees every pool and which lease holds a GPU."""
    p = auth.current_principal()
    return p.name if p.kind == auth.Kind.TENANT else None


def _provider() -> str | None:
    """A provider's own name: its reads of nodes are scoped to its own."""
    p = auth.current_principal()
    return p.name if p.kind == auth.Kind.PROVIDER else None


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):
    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery

    async def SearchOffers(
        self, request: discovery_pb2.SearchOffersRequest, context: Ctx
    ) -> discovery_pb2.SearchOffersResponse:
        return self.discovery.search(request, _tenant())

    async def GetNode(
        self, request: discovery_pb2.GetNodeRequest, context: Ctx
    ) -> discovery_pb2.GetNodeResponse:
        node = self.discovery.node(request.name, _tenant(), _provider())
        return discovery_pb2.GetNodeResponse(
            node=node, revision=self.discovery.inv.revision, replica_version=__version__
        )

    async def ListNodes(
        self, request: discovery_pb2.ListNodesRequest, context: Ctx
    ) -> discovery_pb2.ListNodesResponse:
        self.discovery.take_read(_tenant())
        revision = self.discovery.inv.revision
        nodes, token = self.discovery.list_nodes(request, _tenant(), _provider())
        return discovery_pb2.ListNodesResponse(nodes=nodes, next_page_token=token, revision=revision)

    async def ListProviders(
        self, request: discovery_pb2.ListProvidersRequest, context: Ctx
    ) -> discovery_pb2.ListProvidersResponse:
        self.discovery.take_read(_tenant())
        revision = self.discovery.inv.revision
        providers, token = self.discovery.list_providers(request.page_size, request.page_token, _tenant())
        return discovery_pb2.ListProvidersResponse(
            providers=providers, next_page_token=token, revision=revision, replica_version=__version__
        )

    async def SummarizeCapacity(
        self, request: discovery_pb2.SummarizeCapacityRequest, context: Ctx
    ) -> discovery_pb2.SummarizeCapacityResponse:
        self.discovery.take_read(_tenant())
        return self.discovery.summarize(request, _tenant())

    async def WatchCapacity(
        self, request: discovery_pb2.WatchCapacityRequest, context: Ctx
    ) -> AsyncIterator[discovery_pb2.WatchCapacityResponse]:
        async for event in self.discovery.watch(request.provider, _tenant()):
            yield event
