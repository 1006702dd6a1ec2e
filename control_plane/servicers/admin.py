"""AdminService: node operator states, lease revocation, usage records and tokens."""

from __future__ import annotations

import time
from typing import Any, TypeAlias

import grpc
from google.protobuf import timestamp_pb2

from control_plane import auth, errors
from control_plane.domain import pagination
from control_plane.domain.names import parse_lease_name, parse_node_name, valid_id
from control_plane.adapters.index import Inventory
from control_plane.servicers.lease import Leases, now_ts
from control_plane.adapters.store import EtcdStore, mod_revision_is, put
from control_plane.adapters.store import delete as delete_op
from gpufed.v1 import admin_pb2, admin_pb2_grpc, common_pb2, lease_pb2

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
NodeState = common_pb2.NodeState
MAX_DRAIN_GRACE_S = 7 * 24 * 3600
_KINDS = {
    admin_pb2.TOKEN_KIND_TENANT: auth.Kind.TENANT,
    admin_pb2.TOKEN_KIND_PROVIDER: auth.Kind.PROVIDER,
    admin_pb2.TOKEN_KIND_ADMIN: auth.Kind.ADMIN,
}
_KIND_PB = {v: k for k, v in _KINDS.items()}


def _ts(iso: str) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromJsonString(iso.replace("+00:00", "Z"))
    return ts


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, store: EtcdStore, inventory: Inventory, leases: Leases) -> None:
        self.store = store
        self.keys = store.keys
        self.inv = inventory
        self.leases = leases

    async def _set_state(
        self, name: str, state: int, reason: str, deadline_s: float | None = None
    ) -> common_pb2.Node:
        provider, node_id = parse_node_name(name)
        if len(reason) > 256:
            raise errors.invalid("INVALID_REASON", "reason is at most 256 characters")
        key = self.keys.node(provider, node_id)
        for _ in range(10):
            kv = await self.store.get(key)
            if kv is None:
                raise errors.not_found("NODE_NOT_FOUND", f"{name} is not registered", node=name)
            node = common_pb2.Node.FromString(kv.value)
            node.state = state  # type: ignore[assignment]
            node.state_reason = reason if state else ""
            node.ClearField("drain_deadline")
            if deadline_s is not None:
                node.drain_deadline.FromNanoseconds(int(deadline_s * 1e9))
            node.update_time.CopyFrom(now_ts())
            resp = await self.store.txn(
                [mod_revision_is(key, kv.mod_revision)], [put(key, node.SerializeToString())]
            )
            if resp.succeeded:
                await self.inv.wait_for_revision(resp.header.revision)
                view = self.inv.view(name)
                return view if view is not None else node
        raise errors.ApiError(
            grpc.StatusCode.ABORTED, "NODE_CHANGING", "the node record kept changing; retry"
        )

    async def CordonNode(
        self, request: admin_pb2.CordonNodeRequest, context: Ctx
    ) -> admin_pb2.CordonNodeResponse:
        auth.require(auth.Kind.ADMIN)
        node = await self._set_state(request.name, NodeState.NODE_STATE_CORDONED, request.reason)
        return admin_pb2.CordonNodeResponse(node=node)

    async def UncordonNode(
        self, request: admin_pb2.UncordonNodeRequest, context: Ctx
    ) -> admin_pb2.UncordonNodeResponse:
        auth.require(auth.Kind.ADMIN)
        node = await self._set_state(request.name, NodeState.NODE_STATE_UNSPECIFIED, "")
        return admin_pb2.UncordonNodeResponse(node=node)

    async def DrainNode(
        self, request: admin_pb2.DrainNodeRequest, context: Ctx
    ) -> admin_pb2.DrainNodeResponse:
        auth.require(auth.Kind.ADMIN)
        grace = request.grace.seconds + request.grace.nanos / 1e9
        if not 0 <= grace <= MAX_DRAIN_GRACE_S:
            raise errors.invalid("INVALID_GRACE", f"grace must be in [0, {MAX_DRAIN_GRACE_S}] seconds")
        node = await self._set_state(
            request.name, NodeState.NODE_STATE_DRAINING, request.reason, time.time() + grace
        )
        return admin_pb2.DrainNodeResponse(node=node)

    async def RevokeLease(
        self, request: admin_pb2.RevokeLeaseRequest, context: Ctx
    ) -> admin_pb2.RevokeLeaseResponse:
        auth.require(auth.Kind.ADMIN)
        lease_id = parse_lease_name(request.name)
        lease = await self.leases.end(lease_id, lease_pb2.LEASE_END_REASON_REVOKED, request.reason)
        return admin_pb2.RevokeLeaseResponse(lease=lease)

    async def ListUsageRecords(
        self, request: admin_pb2.ListUsageRecordsRequest, context: Ctx
    ) -> admin_pb2.ListUsageRecordsResponse:
        p = auth.require(auth.Kind.ADMIN, auth.Kind.PROVIDER)
        provider = request.provider
        if provider and not valid_id(provider):
            raise errors.invalid("INVALID_PROVIDER", f"{provider!r} is not a valid provider name")
        if p.kind == auth.Kind.PROVIDER:
            if provider and provider != p.name:
                raise errors.permission_denied("OTHER_PROVIDER", "a provider token sees only its own usage")
            provider = p.name
        size = pagination.page_size(request.page_size)
        start_ns = request.start_time.ToNanoseconds() if request.HasField("start_time") else 0
        end_ns = request.end_time.ToNanoseconds() if request.HasField("end_time") else 2**63 - 1
        kvs, _ = await self.store.get_prefix(self.keys.records_dir("usage"))
        records = []
        for kv in kvs:
            r = admin_pb2.UsageRecord.FromString(kv.value)
            if (not provider or r.provider == provider) and start_ns <= r.end_time.ToNanoseconds() < end_ns:
                records.append(r)
        records.sort(key=lambda r: (r.end_time.ToNanoseconds(), r.name))
        query = pagination.query_hash("usage", provider, str(start_ns), str(end_ns))
        start, end, token = pagination.paginate(len(records), request.page_token, size, query)
        return admin_pb2.ListUsageRecordsResponse(usage_records=records[start:end], next_page_token=token)

    async def CreateToken(
        self, request: admin_pb2.CreateTokenRequest, context: Ctx
    ) -> admin_pb2.CreateTokenResponse:
        auth.require(auth.Kind.ADMIN)
        kind = _KINDS.get(request.kind)
        if kind is None:
            raise errors.invalid("INVALID_TOKEN_KIND", "kind must be TENANT, PROVIDER or ADMIN")
        if not valid_id(request.principal):
            raise errors.invalid(
                "INVALID_PRINCIPAL", f"{request.principal!r} must be a DNS label (a-z, 0-9, -)"
            )
        secret, record = auth.new_token(kind, request.principal)
        await self.store.put(self.keys.token(record.token_id), record.to_json())
        token = admin_pb2.Token(
            name=f"tokens/{record.token_id}",
            kind=request.kind,
            principal=record.principal,
            create_time=_ts(record.create_time),
        )
        return admin_pb2.CreateTokenResponse(token=token, secret=secret)

    async def ListTokens(
        self, request: admin_pb2.ListTokensRequest, context: Ctx
    ) -> admin_pb2.ListTokensResponse:
        auth.require(auth.Kind.ADMIN)
        kvs, _ = await self.store.get_prefix(self.keys.dir("tokens"))
        tokens = []
        for kv in kvs:
            token_id = self.keys.relative(kv.key)[1]
            rec = auth.TokenRecord.from_json(token_id, kv.value)
            tokens.append(
                admin_pb2.Token(
                    name=f"tokens/{token_id}",
                    kind=_KIND_PB[rec.kind],
                    principal=rec.principal,
                    create_time=_ts(rec.create_time),
                )
            )
        return admin_pb2.ListTokensResponse(tokens=tokens)

    async def DeleteToken(
        self, request: admin_pb2.DeleteTokenRequest, context: Ctx
    ) -> admin_pb2.DeleteTokenResponse:
        auth.require(auth.Kind.ADMIN)
        prefix, _, token_id = request.name.partition("/")
        if prefix != "tokens" or not token_id.isalnum():
            raise errors.invalid("INVALID_TOKEN_NAME", "token name must be tokens/{id}")
        key = self.keys.token(token_id)
        resp = await self.store.txn([], [delete_op(key)])
        if not resp.responses[0].response_delete_range.deleted:
            raise errors.not_found("TOKEN_NOT_FOUND", f"{request.name} does not exist")
        # Read your writes: once this returns, this replica refuses the token.
        await self.inv.wait_for_revision(resp.header.revision)
        return admin_pb2.DeleteTokenResponse()
