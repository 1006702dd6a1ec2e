"""How clients (SDK, CLI, daemon) reach a replica: TLS unless told otherwise.

TLS with the given CA, or with the system roots when none is given; a client certificate where
configured (daemons, for mTLS). Plaintext only when asked for explicitly (`insecure`, or
GPUFED_INSECURE=1), for a replica on loopback: off loopback it logs one warning per process,
because a bearer token then crosses the wire in the clear (on loopback it never leaves the host).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence

import grpc

from gpufed.settings import truthy

# The stdlib logger: a process that configured logging (the daemon) routes it through its chain;
# the CLI configures none, so Python prints it to stderr and stdout stays the command's output.
log = logging.getLogger(__name__)
INSECURE_WARNING = "plaintext to the control plane (--insecure): tokens cross the network in the clear"
_warned = False


def insecure_from_env(env: Mapping[str, str] | None = None) -> bool:
    return truthy((os.environ if env is None else env).get("GPUFED_INSECURE", ""))


def channel_credentials(
    *,
    ca_cert: bytes | None = None,
    tls: bool = False,
    client_cert: bytes | None = None,
    client_key: bytes | None = None,
    insecure: bool | None = None,
    endpoints: str | Sequence[str] = "",
) -> grpc.ChannelCredentials | None:
    """The channel credentials, or None for plaintext. A CA, `tls` or a client certificate
    always means TLS; otherwise plaintext only if `insecure` (None: GPUFED_INSECURE). The
    warning is left out when every one of `endpoints` is on loopback."""
    global _warned
    wants_tls = tls or ca_cert is not None or client_cert is not None
    if not wants_tls and (insecure if insecure is not None else insecure_from_env()):
        if not _warned and not on_loopback(endpoints):
            _warned = True
            log.warning(INSECURE_WARNING)
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=ca_cert, private_key=client_key, certificate_chain=client_cert
    )


# Explicit message sizes, the same in every gpufed process. A request is small (the largest, a
# node's hello, stays far below 1 MiB by the proto's bounds); an answer may carry a page of
# 1,000 nodes. Past these, gRPC answers RESOURCE_EXHAUSTED before any gpufed code runs.
MAX_REQUEST_BYTES = 4 << 20
MAX_RESPONSE_BYTES = 16 << 20
CLIENT_OPTIONS = [
    ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
]
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
]


def address_target(
    hosts: Sequence[tuple[str, str]], resolve: Callable[[str], list[str]] | None = None
) -> str:
    """One gRPC target for several (host, port) endpoints: an ipv4:/ipv6: address list, which
    gRPC fails over between. One name stays a dns: target (gRPC re-resolves it: replicas or
    members behind one name); several names are resolved here, once. ValueError if nothing
    resolves."""
    addresses: list[tuple[str, str]] = []
    for h, p in hosts:
        try:
            ipaddress.ip_address(h)
            addresses.append((h, p))
        except ValueError:
            if len(hosts) == 1:
                return f"dns:///{h}:{p}"
            addresses.extend((ip, p) for ip in (resolve or resolve_host)(h))
    if not addresses:
        raise ValueError(f"no address for {list(hosts)}")
    families = {ipaddress.ip_address(h).version for h, _ in addresses}
    if families == {4}:
        return "ipv4:" + ",".join(f"{h}:{p}" for h, p in addresses)
    return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in addresses)


def resolve_host(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ValueError(f"{host!r} does not resolve: {e}") from e
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def on_loopback(endpoints: str | Sequence[str]) -> bool:
    """Whether every endpoint is a loopback address or "localhost" (False for none, or a
    malformed one: the warning errs on the side of showing)."""
    try:
        hosts = split_endpoints(endpoints)
    except ValueError:
        return False
    for host, _ in hosts:
        if host.lower() == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False  # a name: it may resolve anywhere
    return True


def split_endpoints(endpoints: str | Sequence[str]) -> list[tuple[str, str]]:
    """("host", "port") of "h1:p1,h2:p2" or a list of "host:port" ("[v6]:port" too)."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"endpoint {item!r} must be host:port")
        out.append((host.strip("[]"), port))
    if not out:
        raise ValueError("no endpoint given")
    return out


# Calls spread over every replica the target names and skip those whose health says
# NOT_SERVING (gRPC's client-side health checking): a replica that drains, or lost etcd, gets no
# new calls while its connection still stands.
REPLICAS_SERVICE_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
)
