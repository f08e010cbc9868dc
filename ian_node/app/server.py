"""The HTTP API's server: uvicorn on a thread of the node's process, on a socket bound before it starts.

`bind` takes the port first, so that a port in use is a clear start-up error (:class:`ApiStartError`,
naming the address and the config keys) before any other part of the node runs; `start` then serves
on that socket, and `stop` lets requests in flight finish (a pull writes the state).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from ian_node.config import ApiConfig

logger = logging.getLogger(__name__)

#: Seconds `start` waits for uvicorn to serve, and `stop` for requests in flight to finish.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class ApiStartError(OSError):
    """The API cannot listen (the port is in use, the address is not this host's)."""


class ApiServer:
    """The API on its own thread: `bind`, `start`, `stop`."""

    def __init__(self, app: FastAPI, config: ApiConfig) -> None:
        self.app = app
        self.config = config
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The (IP, port) the API listens on; the real port when configured as 0."""
        if self._socket is None:
            raise RuntimeError("the API is not running")
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        return self.address[1]

    def bind(self) -> socket.socket:
        """Take the configured address; ApiStartError when it cannot be had."""
        if self._socket is not None:
            return self._socket
        bind, port = self.config.bind, self.config.port
        sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
        try:
            sock.bind((bind, port))
        except OSError as exc:
            sock.close()
            raise ApiStartError(exc.errno, f"the HTTP API cannot listen on {bind} port {port} (api.bind, api.port): "
                                           f"{exc.strerror}") from exc
        self._socket = sock
        return sock

    def start(self) -> None:
        """Serve on the bound socket (binding it first if needed); return once uvicorn is serving."""
        sock = self.bind()
        config = uvicorn.Config(self.app, host=self.config.bind, port=self.port, log_config=None, access_log=False,
                                lifespan="off", server_header=False, timeout_graceful_shutdown=int(STOP_TIMEOUT_S))
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="ian-node-api",
                                  daemon=True)
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ApiStartError(f"the HTTP API did not start on {self.config.bind} port {self.config.port} "
                                    "(see the log)")
            time.sleep(0.01)
        logger.info("HTTP API on http://%s:%d%s", self.config.bind, self.port,
                    " (bearer token required)" if self.config.token else "")
        if self.config.token is None and not ipaddress.ip_address(self.config.bind).is_loopback:
            logger.warning("the HTTP API listens on %s without a token: anyone who reaches it can trigger "
                           "pulls and retries (set api.token)", self.config.bind)

    def stop(self) -> None:
        """Stop listening and wait (up to STOP_TIMEOUT_S) for the requests in flight."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S + 5.0)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
