"""AdminService (control_plane.app.admin does the work)."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from control_plane import auth
from control_plane.app.admin import Admin
from control_plane.app.burst import BurstPolicies
from control_plane.app.quotas import Quotas
from gpufed.v1 import admin_pb2, admin_pb2_grpc, common_pb2

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
NodeState = common_pb2.NodeState


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, admin: Admin, quotas: Quotas, burst: BurstPolicies) -> None:
        self.admin = admin
        self.quotas = quotas
        self.burst = burst

    async def CordonNode(
        self, request: admin_pb2.CordonNodeRequest, context: Ctx
    ) -> admin_pb2.CordonNodeResponse:
        node = await self.admin.set_state(request.name, NodeState.NODE_STATE_CORDONED, request.reason)
        return admin_pb2.CordonNodeResponse(node=node)

    async def SetGpuHealthy(
        self, request: admin_pb2.SetGpuHealthyRequest, context: Ctx
    ) -> admin_pb2.SetGpuHealthyResponse:
        who = str(auth.current_principal())
        node = await self.admin.set_gpu_healthy(request.node, request.gpu_uuid, request.reason, who)
        return admin_pb2.SetGpuHealthyResponse(node=node)

    async def UncordonNode(
        self, request: admin_pb2.UncordonNodeRequest, context: Ctx
    ) -> admin_pb2.UncordonNodeResponse:
        node = await self.admin.set_state(request.name, NodeState.NODE_STATE_UNSPECIFIED, "")
        return admin_pb2.UncordonNodeResponse(node=node)

    async def DrainNode(
        self, request: admin_pb2.DrainNodeRequest, context: Ctx
    ) -> admin_pb2.DrainNodeResponse:
        grace = request.grace.seconds + request.grace.nanos / 1e9
        node = await self.admin.set_state(request.name, NodeState.NODE_STATE_DRAINING, request.reason, grace)
        return admin_pb2.DrainNodeResponse(node=node)

    async def RevokeLease(
        self, request: admin_pb2.RevokeLeaseRequest, context: Ctx
    ) -> admin_pb2.RevokeLeaseResponse:
        return admin_pb2.RevokeLeaseResponse(lease=await self.admin.revoke(request.name, request.reason))

    async def ListUsageRecords(
        self, request: admin_pb2.ListUsageRecordsRequest, context: Ctx
    ) -> admin_pb2.ListUsageRecordsResponse:
        p = auth.current_principal()
        records, token = await self.admin.usage(p, request)
        return admin_pb2.ListUsageRecordsResponse(usage_records=records, next_page_token=token)

    async def CreateToken(
        self, request: admin_pb2.CreateTokenRequest, context: Ctx
    ) -> admin_pb2.CreateTokenResponse:
        token, secret = await self.admin.create_token(request.kind, request.principal, request.private_to)
        return admin_pb2.CreateTokenResponse(token=token, secret=secret)

    async def ListTokens(
        self, request: admin_pb2.ListTokensRequest, context: Ctx
    ) -> admin_pb2.ListTokensResponse:
        tokens, token = await self.admin.list_tokens(request.page_size, request.page_token)
        return admin_pb2.ListTokensResponse(tokens=tokens, next_page_token=token)

    async def DeleteToken(
        self, request: admin_pb2.DeleteTokenRequest, context: Ctx
    ) -> admin_pb2.DeleteTokenResponse:
        await self.admin.delete_token(request.name)
        return admin_pb2.DeleteTokenResponse()

    async def SetQuota(self, request: admin_pb2.SetQuotaRequest, context: Ctx) -> admin_pb2.SetQuotaResponse:
        return admin_pb2.SetQuotaResponse(quota=await self.quotas.set(request.quota))

    async def GetQuota(self, request: admin_pb2.GetQuotaRequest, context: Ctx) -> admin_pb2.GetQuotaResponse:
        return self.quotas.get(request.name, auth.current_principal())

    async def SetBurstPolicy(
        self, request: admin_pb2.SetBurstPolicyRequest, context: Ctx
    ) -> admin_pb2.SetBurstPolicyResponse:
        policy = await self.burst.set(request.policy, auth.current_principal())
        return admin_pb2.SetBurstPolicyResponse(policy=policy)

    async def ListAuditEvents(
        self, request: admin_pb2.ListAuditEventsRequest, context: Ctx
    ) -> admin_pb2.ListAuditEventsResponse:
        return self.admin.audit_events(request.page_size, request.page_token)

    async def GetCaller(
        self, request: admin_pb2.GetCallerRequest, context: Ctx
    ) -> admin_pb2.GetCallerResponse:
        return self.admin.caller(auth.current_principal())

    async def GetBurstPolicy(
        self, request: admin_pb2.GetBurstPolicyRequest, context: Ctx
    ) -> admin_pb2.GetBurstPolicyResponse:
        return admin_pb2.GetBurstPolicyResponse(policy=self.burst.get(request.name, auth.current_principal()))
