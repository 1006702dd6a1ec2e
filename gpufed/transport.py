"""How clients (SDK, CLI, daemon) reach a replica: TLS unless told otherwise.

TLS with the given CA, or with the system roots when none is given; a client certificate where
configured (daemons, for mTLS). Plaintext only when asked for explicitly (`insecure`, or
GPUFED_INSECURE=1), for a replica on loopback: it logs one warning per process, because a bearer
token then crosses the wire in the clear.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

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
) -> grpc.ChannelCredentials | None:
    """The channel credentials, or None for plaintext. A CA, `tls` or a client certificate
    always means TLS; otherwise plaintext only if `insecure` (None: GPUFED_INSECURE)."""
    global _warned
    wants_tls = tls or ca_cert is not None or client_cert is not None
    if not wants_tls and (insecure if insecure is not None else insecure_from_env()):
        if not _warned:
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
