"""NodeService.Connect: the daemon's one stream (control_plane.app.nodes does the work)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from control_plane import auth
from control_plane.app.nodes import Nodes
from control_plane.domain import errors
from control_plane.tls import peer_spiffe_ids
from gpufed.v1 import node_pb2, node_pb2_grpc


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, nodes: Nodes) -> None:
        self.nodes = nodes

    async def Connect(
        self,
        request_iterator: AsyncIterator[node_pb2.NodeMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[node_pb2.ControlMessage]:
        p = auth.current_principal()
        try:
            async with asyncio.timeout(self.nodes.hello_timeout):
                first = await anext(aiter(request_iterator), None)
        except TimeoutError:
            raise errors.deadline_exceeded(
                "HELLO_TIMEOUT", f"no hello within {self.nodes.hello_timeout:g} s of the stream's start"
            ) from None
        if first is None:
            return
        session = await self.nodes.open(first, p.name, peer_spiffe_ids(context.auth_context()), p.private_to)
        async for msg in self.nodes.serve(session, request_iterator):
            yield msg
