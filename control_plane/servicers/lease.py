"""LeaseService: exclusive GPU leases (control_plane.app.leases does the work)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from control_plane import auth
from control_plane.app.leases import Leases
from control_plane.domain import lease_rules
from control_plane.domain.errors import DomainError
from control_plane.domain.names import parse_lease_name
from gpufed.v1 import lease_pb2, lease_pb2_grpc

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _scope(p: auth.Principal) -> str | None:
    """Whose leases the caller sees: its own, or (an admin) everyone's."""
    return None if p.kind == auth.Kind.ADMIN else p.name


class LeaseServicer(lease_pb2_grpc.LeaseServiceServicer):
    def __init__(self, leases: Leases) -> None:
        self.leases = leases

    async def CreateLease(
        self, request: lease_pb2.CreateLeaseRequest, context: Ctx
    ) -> lease_pb2.CreateLeaseResponse:
        p = auth.current_principal()
        lease = await self.leases.create(p.name, lease_rules.validate_create(request), request)
        return lease_pb2.CreateLeaseResponse(lease=lease)

    async def GetLease(self, request: lease_pb2.GetLeaseRequest, context: Ctx) -> lease_pb2.GetLeaseResponse:
        p = auth.current_principal()
        lease, _ = await self.leases.get(request.name, _scope(p))
        return lease_pb2.GetLeaseResponse(lease=self.leases.limited(lease))

    async def ListLeases(
        self, request: lease_pb2.ListLeasesRequest, context: Ctx
    ) -> lease_pb2.ListLeasesResponse:
        p = auth.current_principal()
        leases, token = await self.leases.list_leases(
            _scope(p), request.state, request.page_size, request.page_token, p.name
        )
        return lease_pb2.ListLeasesResponse(
            leases=[self.leases.limited(lease) for lease in leases], next_page_token=token
        )

    async def RenewLease(
        self, request: lease_pb2.RenewLeaseRequest, context: Ctx
    ) -> lease_pb2.RenewLeaseResponse:
        p = auth.current_principal()
        return lease_pb2.RenewLeaseResponse(lease=await self.leases.renew(request.name, p.name))

    async def KeepAlive(
        self, request_iterator: AsyncIterator[lease_pb2.KeepAliveRequest], context: Ctx
    ) -> AsyncIterator[lease_pb2.KeepAliveResponse]:
        p = auth.current_principal()
        async for req in request_iterator:
            try:
                renewed = await self.leases.renew(req.name, p.name)
                yield lease_pb2.KeepAliveResponse(name=req.name, expire_time=renewed.expire_time)
            except DomainError as e:
                yield lease_pb2.KeepAliveResponse(name=req.name, error=e.reason)

    async def ReleaseLease(
        self, request: lease_pb2.ReleaseLeaseRequest, context: Ctx
    ) -> lease_pb2.ReleaseLeaseResponse:
        p = auth.current_principal()
        lease_id = parse_lease_name(request.name)
        lease = await self.leases.end(lease_id, lease_pb2.LEASE_END_REASON_RELEASED, tenant=p.name)
        return lease_pb2.ReleaseLeaseResponse(lease=lease)

    async def WatchLease(
        self, request: lease_pb2.WatchLeaseRequest, context: Ctx
    ) -> AsyncIterator[lease_pb2.WatchLeaseResponse]:
        p = auth.current_principal()
        async for event in self.leases.watch(request.name, _scope(p)):
            yield event
