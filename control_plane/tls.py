"""Transport security of a replica's listeners: TLS with certificates that reload without a
restart, mTLS for daemons, and the identity a client certificate carries.

gRPC Python can require a client certificate or not ask for one, never ask without requiring
(its server credentials map `require_client_auth=False` to "don't request"). So developers
(SDK, CLI, grpcurl) use the main listener with server-side TLS, and with `--client-ca` daemons
use a listener of their own (`--node-listen`) that requires a certificate signed by that CA.
NodeService refuses a stream that came without one.

Certificates are read again when a file's modification time changes, at the next handshake
(gRPC's dynamic server certificate configuration): open streams keep their connection.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from control_plane.config import ConfigError
from gpufed.logs import get_logger

log = get_logger(__name__)


class TlsConfigError(ConfigError):
    """The listeners cannot be set up as configured (the replica refuses to start)."""


@dataclass
class ReloadingCertificates:
    """The server certificate (and client CA) files, read again when any of them changes."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    _stamp: tuple[float, ...] = field(default=(), init=False)

    def _mtimes(self) -> tuple[float, ...]:
        paths = [self.cert, self.key] + ([self.client_ca] if self.client_ca else [])
        return tuple(p.stat().st_mtime_ns for p in paths)

    def load(self) -> Any:
        self._stamp = self._mtimes()
        try:
            chain, key = self.cert.read_bytes(), self.key.read_bytes()
            ca = self.client_ca.read_bytes() if self.client_ca else None
        except OSError as e:
            raise TlsConfigError(f"cannot read the TLS files: {e}") from e
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    def fetch(self) -> Any:
        """gRPC's fetcher: a new configuration when a file changed, else None (keep the current)."""
        try:
            if self._mtimes() == self._stamp:
                return None
            config = self.load()
        except (OSError, TlsConfigError) as e:
            log.warning("TLS certificates could not be reloaded; keeping the current ones", error=str(e))
            return None
        log.info("TLS certificates reloaded", cert=str(self.cert))
        return config

    def credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        if require_client_cert and self.client_ca is None:
            raise TlsConfigError("requiring client certificates needs a client CA (--client-ca)")
        return grpc.dynamic_ssl_server_credentials(
            self.load(), self.fetch, require_client_authentication=require_client_cert
        )


def check_listeners(
    listen: str, tls_cert: str, tls_key: str, client_ca: str, node_listen: str, insecure: bool
) -> None:
    """Refuse, before anything starts, a set of listener options that would be unsafe or
    half-configured: plaintext on a non-loopback address without --insecure, a certificate
    without its key, mTLS without a node listener."""
    if bool(tls_cert) != bool(tls_key):
        raise TlsConfigError("--tls-cert and --tls-key go together")
    if (client_ca or node_listen) and not tls_cert:
        raise TlsConfigError("--client-ca and --node-listen need --tls-cert and --tls-key")
    if bool(client_ca) != bool(node_listen):
        raise TlsConfigError("--client-ca and --node-listen go together (mTLS for daemons)")
    if not tls_cert and not is_loopback(listen) and not insecure:
        raise TlsConfigError(
            f"refusing plaintext on {listen}, which is not a loopback address: give --tls-cert and "
            "--tls-key, or --insecure to accept that tokens cross the network in the clear"
        )


def check_console_listen(listen: str, tls_cert: str) -> None:
    """The console serves plaintext only on loopback (a bare :PORT is loopback): elsewhere the
    session cookie would cross the network in the clear."""
    if listen and not listen.startswith(":") and not tls_cert and not is_loopback(listen):
        raise TlsConfigError(
            f"refusing a plaintext console on {listen}, which is not a loopback address: give "
            "--tls-cert and --tls-key (the console then serves HTTPS with them)"
        )


def is_loopback(address: str) -> bool:
    """Whether a listen address (HOST:PORT) serves this host only."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def peer_spiffe_ids(auth_context: dict[str, list[bytes]]) -> list[str]:
    """The URI SANs of the verified client certificate of a call (empty: no certificate)."""
    return [v.decode() for v in auth_context.get("peer_uri", []) or auth_context.get("peer_spiffe_id", [])]
