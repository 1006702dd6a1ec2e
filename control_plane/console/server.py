"""The console's HTTP listener: uvicorn on a thread of its own, so the replica's event loop
and its signal handling stay as they are; its pages call the replica's gRPC listener."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import uvicorn

from control_plane.console.app import create_app
from gpufed.client import Client
from gpufed.logs import get_logger

log = get_logger(__name__)


class ConsoleServer:
    def __init__(
        self,
        listen: str,
        api_target: str,
        credentials: grpc.ChannelCredentials | None,
        tls_cert: str = "",
        tls_key: str = "",
    ) -> None:
        host, _, port = listen.rpartition(":")
        self.api = Client(api_target, "", credentials=credentials, insecure=credentials is None, retries=1)
        app = create_app(self.api, secure_cookie=True)
        config = uvicorn.Config(
            app,
            host=host.strip("[]") or "127.0.0.1",
            port=int(port),
            loop="asyncio",
            lifespan="off",
            log_config=None,
            access_log=False,  # a URL never holds a token, but a log of every page is noise
            ssl_certfile=tls_cert or None,
            ssl_keyfile=tls_key or None,
            server_header=False,
        )
        # Belt and braces beside access_log=False: no line per page (a URL never holds a token,
        # but a log of every poll is noise).
        logging.getLogger("uvicorn.access").disabled = True
        self.tls = bool(tls_cert)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="console", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError("the console's listener did not start (is its port taken?)")
            time.sleep(0.02)
        log.info("console serving", url=self.url)

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = self.server.config.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=5)
        self.api.close()
