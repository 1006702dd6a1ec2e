"""The gpufed Python SDK: a typed, synchronous client over the gpufed.v1 stubs.

    from gpufed.client import Client

    with Client("127.0.0.1:50051", token="gpf_...") as client:
        for offer in client.search_offers(gpu_model="H100", countries=["DE"]):
            print(offer.node, offer.free_gpus, offer.price_per_gpu_hour)
        with client.lease(gpu_count=8, gpu_model="H100", countries=["DE"]) as lease:
            ...  # renewed in the background; released on exit, also when the block raises

Errors come as GpufedError subclasses carrying the status code and the server's reason.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from gpufed.errors import error_info, error_reason, retry_delay
from gpufed.transport import (
    CLIENT_OPTIONS,
    REPLICAS_SERVICE_CONFIG,
    address_target,
    channel_credentials,
    split_endpoints,
)
from gpufed.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    lease_pb2,
    lease_pb2_grpc,
    reservation_pb2,
    reservation_pb2_grpc,
    telemetry_pb2,
    telemetry_pb2_grpc,
)

T = TypeVar("T")
DEFAULT_ENDPOINT = "127.0.0.1:50051"
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
MAX_RETRY_DELAY_S = 5.0
_RNG = random.Random()


class GpufedError(Exception):
    """A failed call: `code` (grpc.StatusCode), `reason` (ErrorInfo reason) and the message."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(f"{code.name}: {reason + ': ' if reason else ''}{message}")
        self.code = code
        self.reason = reason
        self.message = message


class InvalidArgument(GpufedError): ...


class NotFound(GpufedError): ...


class LeaseEnded(GpufedError):
    """The lease ended while it was waited for (reason: its end reason, e.g. PROVISIONING_FAILED)."""


class NoCapacity(GpufedError):
    """No GPUs match (FAILED_PRECONDITION NO_MATCHING_CAPACITY) or they were taken (RESOURCE_EXHAUSTED)."""


class PermissionDenied(GpufedError): ...


class Unauthenticated(GpufedError): ...


class Unavailable(GpufedError): ...


_BY_CODE: dict[grpc.StatusCode, type[GpufedError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: NoCapacity,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


_RNG = random.Random()  # seeded from os.urandom once


def new_request_id() -> str:
    """A fresh idempotency key: unique, not secret (one os.urandom per process, not per call)."""
    return f"{_RNG.getrandbits(128):032x}"


def from_rpc_error(e: grpc.RpcError) -> GpufedError:
    code: grpc.StatusCode = e.code()
    info = error_info(e)
    reason = info.reason if info is not None else ""
    cls = _BY_CODE.get(code, GpufedError)
    if code == grpc.StatusCode.FAILED_PRECONDITION and reason == "NO_MATCHING_CAPACITY":
        cls = NoCapacity
    return cls(code, reason, e.details() or "")


def gpu_filter(
    gpu_model: str = "",
    min_gpu_memory_gb: float = 0,
    countries: Sequence[str] = (),
    exclude_countries: Sequence[str] = (),
    regions: Sequence[str] = (),
    providers: Sequence[str] = (),
    near: tuple[float, float, float] | None = None,
    max_price: float = 0.0,
    labels: dict[str, str] | None = None,
    include_degraded: bool = False,
    mig_profile: str = "",
) -> common_pb2.GpuFilter:
    f = common_pb2.GpuFilter(
        gpu_model=gpu_model,
        min_gpu_memory_bytes=int(min_gpu_memory_gb * 1024**3),
        countries=list(countries),
        exclude_countries=list(exclude_countries),
        regions=list(regions),
        providers=list(providers),
        max_price_per_gpu_hour=max_price,
        labels=labels or {},
        include_degraded=include_degraded,
        mig_profile=mig_profile,
    )
    if near is not None:
        f.near.CopyFrom(common_pb2.GeoCircle(latitude=near[0], longitude=near[1], radius_km=near[2]))
    return f


POOL_CHOICES = {
    "": common_pb2.POOL_CHOICE_UNSPECIFIED,
    "own-first": common_pb2.POOL_CHOICE_OWN_FIRST,
    "own-only": common_pb2.POOL_CHOICE_OWN_ONLY,
    "federation-only": common_pb2.POOL_CHOICE_FEDERATION_ONLY,
}


def pool_choice(name: str) -> common_pb2.PoolChoice.ValueType:
    if name not in POOL_CHOICES:
        raise ValueError(f"pool must be one of {sorted(k for k in POOL_CHOICES if k)}")
    return POOL_CHOICES[name]


def timestamp_of(seconds: float) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=int(seconds), nanos=int(seconds % 1 * 1e9))


def _set_window(
    req: discovery_pb2.SearchOffersRequest | discovery_pb2.SummarizeCapacityRequest,
    available_from: float | None,
    available_for_s: int,
) -> None:
    if available_for_s:
        req.available_for.seconds = available_for_s
    if available_from is not None:
        req.available_from.CopyFrom(timestamp_of(available_from))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Client:
    """A connection to the control plane: one endpoint, several ("a:50051,b:50051" or a list),
    or a DNS name that resolves to several. Calls spread over the replicas and skip any whose
    health says NOT_SERVING (draining, or cut off from etcd); a call that fails UNAVAILABLE is
    retried with backoff and jitter on the others. Thread-safe; close it (or use `with`)."""

    def __init__(
        self,
        endpoint: str | Sequence[str] | None = None,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        credentials: grpc.ChannelCredentials | None = None,
        insecure: bool | None = None,
    ) -> None:
        """TLS with `credentials`, else with the system roots; plaintext only when `insecure`
        (None: GPUFED_INSECURE=1), for a replica on loopback."""
        given = endpoint or os.environ.get("GPUFED_ENDPOINT", DEFAULT_ENDPOINT)
        self.endpoint = given if isinstance(given, str) else ",".join(given)
        self.token = token if token is not None else os.environ.get("GPUFED_TOKEN", "")
        self.timeout = timeout
        self.retries = retries
        if credentials is None:
            credentials = channel_credentials(insecure=insecure, endpoints=self.endpoint)
        self.tls = credentials is not None
        self._shared = False  # Client.sharing: another client's channel, not ours to close
        hosts = split_endpoints(self.endpoint)
        options: list[tuple[str, int | str]] = list(CLIENT_OPTIONS)
        if len(hosts) > 1 or not _is_ip(hosts[0][0]):
            # Several replicas (or a name for several): spread calls, skip the NOT_SERVING ones.
            # One address stays one: a draining replica that still answers beats no answer.
            options.append(("grpc.service_config", REPLICAS_SERVICE_CONFIG))
        if len(hosts) == 1:
            target = self.endpoint  # as given: gRPC resolves (and re-resolves) the name itself
        else:
            target = address_target(hosts)
            if self.tls:
                # An address list names no host: replicas' certificates are checked against the
                # first endpoint's name (give them all one name, or a SAN for each).
                options.append(("grpc.ssl_target_name_override", hosts[0][0]))
        if credentials is not None:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.discovery = discovery_pb2_grpc.DiscoveryServiceStub(self.channel)
        self.leases = lease_pb2_grpc.LeaseServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.reservations = reservation_pb2_grpc.ReservationServiceStub(self.channel)
        self.telemetry = telemetry_pb2_grpc.TelemetryServiceStub(self.channel)

    @classmethod
    def sharing(cls, other: Client, token: str) -> Client:
        """A client on `other`'s channel with another token: no connection of its own (the
        console serves many sessions over one channel to its replica). Closing it leaves the
        channel open."""
        c = cls.__new__(cls)
        c.__dict__.update(other.__dict__)
        c.token = token
        c._shared = True
        return c

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._shared:
            self.channel.close()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def call(self, method: Any, request: Any, *, retry: bool = True, timeout: float | None = None) -> Any:
        """One unary call with a deadline; UNAVAILABLE and ABORTED are retried (every gpufed RPC is
        safe to retry, CreateLease through its request_id), and so is a rate limit, after the
        delay its RetryInfo names (at most MAX_RETRY_DELAY_S)."""
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                return method(request, metadata=self.metadata, timeout=timeout or self.timeout)
            except grpc.RpcError as e:
                if attempt + 1 < attempts:
                    if e.code() in _RETRYABLE:
                        # Jitter: clients of a replica that just went away must not come back
                        # in lockstep.
                        threading.Event().wait(0.2 * 2**attempt * _RNG.uniform(0.5, 1.0))
                        continue
                    delay = retry_delay(e) if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
                    if delay is not None and delay <= MAX_RETRY_DELAY_S:
                        threading.Event().wait(delay)
                        continue
                raise self._explained(from_rpc_error(e)) from None
        raise AssertionError("unreachable")

    def _explained(self, err: GpufedError) -> GpufedError:
        """An unreachable replica, with the likeliest cause when TLS and plaintext disagree."""
        if err.code != grpc.StatusCode.UNAVAILABLE or err.reason:
            return err
        text = err.message.lower()
        hint = ""
        if self.tls and ("handshake" in text or "ssl" in text):
            hint = " (TLS failed: a replica serving plaintext on loopback needs --insecure)"
        elif not self.tls and ("socket closed" in text or "connection reset" in text or "eof" in text):
            hint = " (no plaintext answer: a replica serving TLS needs --ca-cert or --tls)"
        return type(err)(err.code, err.reason, err.message + hint) if hint else err

    # -- discovery ------------------------------------------------------------------------------

    def search_offers(
        self,
        *,
        min_free_gpus: int = 0,
        order_by: int = 0,
        page_size: int = 0,
        limit: int | None = None,
        pool: str = "",
        available_from: float | None = None,
        available_for_s: int = 0,
        **filter_args: Any,
    ) -> Iterator[discovery_pb2.Offer]:
        """Every matching offer, page by page (up to `limit`). `pool`: "own-first" (the default
        for a tenant with a private pool), "own-only" or "federation-only". With
        `available_for_s` (and `available_from`, seconds since the epoch; default now): only
        GPUs free for all of that window, what create_reservation could book."""
        req = discovery_pb2.SearchOffersRequest(
            filter=gpu_filter(**filter_args),
            min_free_gpus=min_free_gpus,
            order_by=order_by,  # type: ignore[arg-type]
            page_size=page_size,
            pool=pool_choice(pool),
        )
        _set_window(req, available_from, available_for_s)
        n = 0
        while True:
            resp = self.call(self.discovery.SearchOffers, req)
            for offer in resp.offers:
                if limit is not None and n >= limit:
                    return
                n += 1
                yield offer
            if not resp.next_page_token:
                return
            req.page_token = resp.next_page_token

    def get_node(self, name: str) -> common_pb2.Node:
        return self.call(self.discovery.GetNode, discovery_pb2.GetNodeRequest(name=name)).node  # type: ignore[no-any-return]

    def list_nodes(self, provider: str = "", state: int = 0) -> list[common_pb2.Node]:
        req = discovery_pb2.ListNodesRequest(provider=provider, state=state, page_size=1000)  # type: ignore[arg-type]
        out: list[common_pb2.Node] = []
        while True:
            resp = self.call(self.discovery.ListNodes, req)
            out.extend(resp.nodes)
            if not resp.next_page_token:
                return out
            req.page_token = resp.next_page_token

    def list_providers(self) -> list[discovery_pb2.Provider]:
        return list(
            self.call(
                self.discovery.ListProviders, discovery_pb2.ListProvidersRequest(page_size=1000)
            ).providers
        )

    def server_version(self) -> str:
        """The release of the replica that answered ("" for one before 0.2.0, which did not say)."""
        req = discovery_pb2.ListProvidersRequest(page_size=1)
        return str(self.call(self.discovery.ListProviders, req).replica_version)

    def summarize_capacity(
        self, *, available_from: float | None = None, available_for_s: int = 0, **filter_args: Any
    ) -> discovery_pb2.SummarizeCapacityResponse:
        """Totals by model x country x health; with a window (as search_offers), free_gpus
        counts the GPUs free for all of it."""
        req = discovery_pb2.SummarizeCapacityRequest(filter=gpu_filter(**filter_args))
        _set_window(req, available_from, available_for_s)
        return self.call(self.discovery.SummarizeCapacity, req)  # type: ignore[no-any-return]

    def node_telemetry(self, name: str, max_samples: int = 0) -> telemetry_pb2.GetNodeTelemetryResponse:
        req = telemetry_pb2.GetNodeTelemetryRequest(name=name, max_samples=max_samples)
        return self.call(self.telemetry.GetNodeTelemetry, req)  # type: ignore[no-any-return]

    # -- leases ---------------------------------------------------------------------------------

    def set_gpu_healthy(self, node: str, gpu_uuid: str, reason: str) -> common_pb2.Node:
        """An operator's word that a GPU is fit again: clears its repair (admin only; audited)."""
        req = admin_pb2.SetGpuHealthyRequest(node=node, gpu_uuid=gpu_uuid, reason=reason)
        return self.call(self.admin.SetGpuHealthy, req).node  # type: ignore[no-any-return]

    def create_lease(
        self,
        gpu_count: int,
        *,
        ttl_s: int = 60,
        spread: bool = False,
        request_id: str | None = None,
        ssh_keys: Sequence[str] = (),
        provider_options: Mapping[str, str] | None = None,
        pool: str = "",
        allow_mixed: bool = False,
        max_wait_s: int = 0,
        interruptible: bool = False,
        **filter_args: Any,
    ) -> lease_pb2.Lease:
        """The granted lease: ACTIVE, or PROVISIONING while the providers' hooks set up access
        with `ssh_keys` (OpenSSH public key lines) and `provider_options` (see wait_active).
        With `max_wait_s`, a request the federation cannot serve now is QUEUED for up to that
        long instead of refused (see wait_granted). `interruptible`: at the interruptible price,
        preempted with notice (watch_lease: PREEMPTING, then ENDED PREEMPTED)."""
        req = lease_pb2.CreateLeaseRequest(
            request_id=request_id or new_request_id(),
            gpu_count=gpu_count,
            filter=gpu_filter(**filter_args),
            placement=lease_pb2.PLACEMENT_SPREAD if spread else lease_pb2.PLACEMENT_SINGLE_NODE,
            ttl=duration_pb2.Duration(seconds=ttl_s),
            access=lease_pb2.AccessRequest(
                ssh_public_keys=list(ssh_keys), provider_options=dict(provider_options or {})
            ),
            pool=pool_choice(pool),
            allow_mixed=allow_mixed,
            max_wait=duration_pb2.Duration(seconds=max_wait_s),
            interruptible=interruptible,
        )
        return self.call(self.leases.CreateLease, req).lease  # type: ignore[no-any-return]

    def wait_active(self, name: str, timeout: float = 300.0) -> lease_pb2.Lease:
        """The lease once ACTIVE, with its `access_details` (at once if it is). A lease that
        ends first (PROVISIONING_FAILED: a provider's hook failed) raises LeaseEnded with its
        end message; no ACTIVE within `timeout` raises Unavailable (DEADLINE_EXCEEDED)."""
        request = lease_pb2.WatchLeaseRequest(name=name)
        deadline = time.monotonic() + timeout
        W = lease_pb2.WatchLeaseResponse

        def open_stream() -> Iterator[lease_pb2.WatchLeaseResponse]:
            left = max(0.001, deadline - time.monotonic())
            return self.leases.WatchLease(request, metadata=self.metadata, timeout=left)  # type: ignore[no-any-return]

        for event in self._resumed(open_stream):
            if event.type == W.EVENT_TYPE_ENDED:
                reason = lease_pb2.LeaseEndReason.Name(event.lease.end_reason).removeprefix(
                    "LEASE_END_REASON_"
                )
                raise LeaseEnded(
                    grpc.StatusCode.FAILED_PRECONDITION, reason, event.lease.end_message or reason
                )
            if event.lease.state == lease_pb2.LEASE_STATE_ACTIVE:
                return event.lease
        raise LeaseEnded(grpc.StatusCode.FAILED_PRECONDITION, "LEASE_ENDED", f"{name} ended")

    def get_lease(self, name: str) -> lease_pb2.Lease:
        return self.call(self.leases.GetLease, lease_pb2.GetLeaseRequest(name=name)).lease  # type: ignore[no-any-return]

    def list_leases(self, state: int = 0) -> list[lease_pb2.Lease]:
        req = lease_pb2.ListLeasesRequest(state=state, page_size=1000)  # type: ignore[arg-type]
        out: list[lease_pb2.Lease] = []
        while True:
            resp = self.call(self.leases.ListLeases, req)
            out.extend(resp.leases)
            if not resp.next_page_token:
                return out
            req.page_token = resp.next_page_token

    def audit_events(self, page_size: int = 50, page_token: str = "") -> admin_pb2.ListAuditEventsResponse:
        """One page of the answering replica's recent audit events, newest first (admin)."""
        req = admin_pb2.ListAuditEventsRequest(page_size=page_size, page_token=page_token)
        return self.call(self.admin.ListAuditEvents, req)  # type: ignore[no-any-return]

    def caller(self) -> admin_pb2.GetCallerResponse:
        """Who this client's token acts as: kind, principal, private-pool tenant."""
        return self.call(self.admin.GetCaller, admin_pb2.GetCallerRequest())  # type: ignore[no-any-return]

    def list_tokens(self) -> list[admin_pb2.Token]:
        """Every token, without secrets (admin), page by page."""
        req = admin_pb2.ListTokensRequest(page_size=1000)
        out: list[admin_pb2.Token] = []
        while True:
            resp = self.call(self.admin.ListTokens, req)
            out.extend(resp.tokens)
            if not resp.next_page_token:
                return out
            req.page_token = resp.next_page_token

    def usage_records(
        self,
        provider: str = "",
        tenant: str = "",
        since: timestamp_pb2.Timestamp | None = None,
        until: timestamp_pb2.Timestamp | None = None,
    ) -> Iterator[admin_pb2.UsageRecord]:
        """Usage records ending in [since, until), page by page, as the caller may see them."""
        req = admin_pb2.ListUsageRecordsRequest(provider=provider, tenant=tenant, page_size=1000)
        if since is not None:
            req.start_time.CopyFrom(since)
        if until is not None:
            req.end_time.CopyFrom(until)
        while True:
            resp = self.call(self.admin.ListUsageRecords, req)
            yield from resp.usage_records
            if not resp.next_page_token:
                return
            req.page_token = resp.next_page_token

    def renew_lease(self, name: str) -> lease_pb2.Lease:
        return self.call(self.leases.RenewLease, lease_pb2.RenewLeaseRequest(name=name)).lease  # type: ignore[no-any-return]

    def release_lease(self, name: str) -> lease_pb2.Lease:
        return self.call(self.leases.ReleaseLease, lease_pb2.ReleaseLeaseRequest(name=name)).lease  # type: ignore[no-any-return]

    def watch_lease(self, name: str) -> Iterator[lease_pb2.WatchLeaseResponse]:
        """The lease's events until it ends. When its replica goes away (UNAVAILABLE) the watch
        is opened again on another, up to `retries` times in a row: it then starts again from
        the lease's current state (a GRANTED event with the current record)."""
        request = lease_pb2.WatchLeaseRequest(name=name)
        yield from self._resumed(lambda: self.leases.WatchLease(request, metadata=self.metadata))

    # -- reservations ---------------------------------------------------------------------------

    def create_reservation(
        self,
        gpu_count: int,
        start: float | timestamp_pb2.Timestamp,
        duration_s: int,
        *,
        spread: bool = False,
        request_id: str | None = None,
        ssh_keys: Sequence[str] = (),
        provider_options: Mapping[str, str] | None = None,
        pool: str = "",
        allow_mixed: bool = False,
        **filter_args: Any,
    ) -> reservation_pb2.Reservation:
        """Book `gpu_count` GPUs from `start` (seconds since the epoch, or a Timestamp) for
        `duration_s`: concrete GPUs at prices frozen now. At the start it becomes a lease
        (`Reservation.lease`; watch it with watch_lease or wait_active)."""
        at = start if isinstance(start, timestamp_pb2.Timestamp) else timestamp_of(start)
        req = reservation_pb2.CreateReservationRequest(
            request_id=request_id or new_request_id(),
            gpu_count=gpu_count,
            filter=gpu_filter(**filter_args),
            placement=lease_pb2.PLACEMENT_SPREAD if spread else lease_pb2.PLACEMENT_SINGLE_NODE,
            pool=pool_choice(pool),
            allow_mixed=allow_mixed,
            start_time=at,
            duration=duration_pb2.Duration(seconds=duration_s),
            access=lease_pb2.AccessRequest(
                ssh_public_keys=list(ssh_keys), provider_options=dict(provider_options or {})
            ),
        )
        return self.call(self.reservations.CreateReservation, req).reservation  # type: ignore[no-any-return]

    def get_reservation(self, name: str) -> reservation_pb2.Reservation:
        req = reservation_pb2.GetReservationRequest(name=name)
        return self.call(self.reservations.GetReservation, req).reservation  # type: ignore[no-any-return]

    def list_reservations(self, state: int = 0, node: str = "") -> list[reservation_pb2.Reservation]:
        req = reservation_pb2.ListReservationsRequest(state=state, page_size=1000, node=node)  # type: ignore[arg-type]
        out: list[reservation_pb2.Reservation] = []
        while True:
            resp = self.call(self.reservations.ListReservations, req)
            out.extend(resp.reservations)
            if not resp.next_page_token:
                return out
            req.page_token = resp.next_page_token

    def cancel_reservation(self, name: str) -> reservation_pb2.Reservation:
        req = reservation_pb2.CancelReservationRequest(name=name)
        return self.call(self.reservations.CancelReservation, req).reservation  # type: ignore[no-any-return]

    def watch_reservation(self, name: str) -> Iterator[reservation_pb2.WatchReservationResponse]:
        """The reservation's events until it ends (BOOKED first; opened again on another
        replica when its own goes away, starting again with BOOKED)."""
        request = reservation_pb2.WatchReservationRequest(name=name)
        yield from self._resumed(lambda: self.reservations.WatchReservation(request, metadata=self.metadata))

    def watch_capacity(self, provider: str = "") -> Iterator[discovery_pb2.WatchCapacityResponse]:
        """A snapshot of every node (SNAPSHOT ... SNAPSHOT_END), then node changes, forever.
        A fresh snapshot may come at any time (after a re-list, or when the watch moved to
        another replica because its own went away): replace what you hold with it."""
        request = discovery_pb2.WatchCapacityRequest(provider=provider)
        yield from self._resumed(lambda: self.discovery.WatchCapacity(request, metadata=self.metadata))

    def _resumed(self, open_stream: Callable[[], Iterator[T]]) -> Iterator[T]:
        """A server stream, opened again (with backoff and jitter) when it ends UNAVAILABLE (its
        replica went away, another serves it) or WATCH_TOO_SLOW (this reader fell behind: the
        new stream starts with a fresh snapshot). At most `retries` failures in a row."""
        failures = 0
        while True:
            try:
                for item in open_stream():
                    failures = 0
                    yield item
                return
            except grpc.RpcError as e:
                slow = e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_reason(e) == "WATCH_TOO_SLOW"
                if (e.code() != grpc.StatusCode.UNAVAILABLE and not slow) or failures >= self.retries:
                    raise from_rpc_error(e) from None
                failures += 1
                threading.Event().wait(0.2 * 2**failures * _RNG.uniform(0.5, 1.0))

    def lease(self, gpu_count: int, *, ttl_s: int = 30, wait_s: float = 300.0, **kwargs: Any) -> HeldLease:
        """A lease held for the duration of a `with` block: renewed every ttl/3 in the background,
        released on exit (also when the block raises). Entering waits until it is ACTIVE (its
        `access` set) for at most `wait_s`, renewing meanwhile; a failed provisioning raises."""
        return HeldLease(self, self.create_lease(gpu_count, ttl_s=ttl_s, **kwargs), wait_s)

    # -- admin ----------------------------------------------------------------------------------

    def create_token(self, kind: str, principal: str, private_to: str = "") -> admin_pb2.CreateTokenResponse:
        """A new token; `private_to` (provider tokens only) makes the nodes it registers that
        tenant's private pool."""
        kinds = {
            "tenant": admin_pb2.TOKEN_KIND_TENANT,
            "provider": admin_pb2.TOKEN_KIND_PROVIDER,
            "admin": admin_pb2.TOKEN_KIND_ADMIN,
        }
        if kind not in kinds:
            raise ValueError(f"kind must be one of {sorted(kinds)}")
        req = admin_pb2.CreateTokenRequest(kind=kinds[kind], principal=principal, private_to=private_to)
        return self.call(self.admin.CreateToken, req, retry=False)  # type: ignore[no-any-return]

    def set_quota(self, name: str, **limits: float) -> admin_pb2.Quota:
        """Set a quota: name "quotas/tenants/{t}" with TenantQuota fields (max_gpus=16, ...) or
        "quotas/providers/{p}" with ProviderQuota fields; unset fields take the defaults."""
        quota = admin_pb2.Quota(name=name)
        part = quota.tenant if name.startswith("quotas/tenants/") else quota.provider
        part.SetInParent()
        for field, value in limits.items():
            setattr(part, field, value)
        req = admin_pb2.SetQuotaRequest(quota=quota)
        return self.call(self.admin.SetQuota, req).quota  # type: ignore[no-any-return]

    def set_burst_policy(
        self, tenant: str, max_price_per_gpu_hour: float = 0.0, countries: Sequence[str] = ()
    ) -> admin_pb2.BurstPolicy:
        """How far `tenant`'s leases may go into the federation (0 / empty: no limit)."""
        policy = admin_pb2.BurstPolicy(
            name=f"burstPolicies/{tenant}",
            max_price_per_gpu_hour=max_price_per_gpu_hour,
            countries=list(countries),
        )
        req = admin_pb2.SetBurstPolicyRequest(policy=policy)
        return self.call(self.admin.SetBurstPolicy, req).policy  # type: ignore[no-any-return]

    def get_burst_policy(self, tenant: str) -> admin_pb2.BurstPolicy:
        req = admin_pb2.GetBurstPolicyRequest(name=f"burstPolicies/{tenant}")
        return self.call(self.admin.GetBurstPolicy, req).policy  # type: ignore[no-any-return]

    def get_quota(self, name: str) -> admin_pb2.GetQuotaResponse:
        return self.call(self.admin.GetQuota, admin_pb2.GetQuotaRequest(name=name))  # type: ignore[no-any-return]


class HeldLease:
    """A lease kept alive by a background thread until the `with` block ends."""

    def __init__(self, client: Client, lease: lease_pb2.Lease, wait_s: float = 300.0) -> None:
        self.client = client
        self.lease = lease
        self.wait_s = wait_s
        self.name = lease.name
        self.renewals = 0
        self.error: GpufedError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep_alive, daemon=True, name=f"keepalive-{lease.name}")

    def __enter__(self) -> HeldLease:
        self._thread.start()
        if self.lease.state == lease_pb2.LEASE_STATE_PROVISIONING:
            try:
                self.lease = self.client.wait_active(self.name, self.wait_s)
            except GpufedError:
                self._stop.set()
                with contextlib.suppress(GpufedError):
                    self.client.release_lease(self.name)  # not ACTIVE: nothing billed
                raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def _keep_alive(self) -> None:
        interval = max((self.lease.ttl.seconds or 30) / 3, 1.0)
        while not self._stop.wait(interval):
            try:
                self.lease = self.client.renew_lease(self.name)
                self.renewals += 1
            except GpufedError as e:
                self.error = e
                if e.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                    return  # ended: nothing left to renew

    def release(self) -> lease_pb2.Lease:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.lease = self.client.release_lease(self.name)
        return self.lease

    @property
    def gpus(self) -> Sequence[lease_pb2.LeasedGpu]:
        return self.lease.gpus

    @property
    def access(self) -> Sequence[lease_pb2.AccessDetails]:
        """How to reach the GPUs: one entry per node, as its provider's hook answered."""
        return self.lease.access_details
