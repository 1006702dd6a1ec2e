"""ReservationService: future windows of GPUs (control_plane.app.reservations does the work)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from control_plane import auth
from control_plane.app.reservations import Reservations
from gpufed.v1 import reservation_pb2 as pb
from gpufed.v1 import reservation_pb2_grpc

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _scope(p: auth.Principal) -> str | None:
    """Whose reservations the caller sees: its own, or (an admin) everyone's."""
    return None if p.kind == auth.Kind.ADMIN else p.name


class ReservationServicer(reservation_pb2_grpc.ReservationServiceServicer):
    def __init__(self, reservations: Reservations) -> None:
        self.reservations = reservations

    async def CreateReservation(
        self, request: pb.CreateReservationRequest, context: Ctx
    ) -> pb.CreateReservationResponse:
        p = auth.current_principal()
        return pb.CreateReservationResponse(reservation=await self.reservations.create(p.name, request))

    async def GetReservation(
        self, request: pb.GetReservationRequest, context: Ctx
    ) -> pb.GetReservationResponse:
        p = auth.current_principal()
        reservation, _ = await self.reservations.get(request.name, _scope(p))
        return pb.GetReservationResponse(reservation=reservation)

    async def ListReservations(
        self, request: pb.ListReservationsRequest, context: Ctx
    ) -> pb.ListReservationsResponse:
        p = auth.current_principal()
        found, token = await self.reservations.list_reservations(
            _scope(p), request.state, request.page_size, request.page_token, p.name, request.node
        )
        return pb.ListReservationsResponse(reservations=found, next_page_token=token)

    async def CancelReservation(
        self, request: pb.CancelReservationRequest, context: Ctx
    ) -> pb.CancelReservationResponse:
        p = auth.current_principal()
        return pb.CancelReservationResponse(
            reservation=await self.reservations.cancel(request.name, _scope(p))
        )

    async def WatchReservation(
        self, request: pb.WatchReservationRequest, context: Ctx
    ) -> AsyncIterator[pb.WatchReservationResponse]:
        p = auth.current_principal()
        async for event in self.reservations.watch(request.name, _scope(p)):
            yield event
