"""The SCP's TLS: its server context, and handshakes moved out of the listener's one thread."""

from __future__ import annotations

import socket
import ssl
from typing import Any

from ian_node.config import ConfigError, TlsConfig


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The SCP's TLS context (None when TLS is off); client certificates required when a CA is set."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("tls.cert", f"cannot load certificate and key: {exc}") from None
    if tls.mutual:
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=str(tls.ca))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError("tls.ca", f"cannot load the CA certificates: {exc}") from None
    return ctx


class HandshakeInConnectionThread:
    """The server's SSL context, wrapping each accepted socket without its TLS handshake.

    pynetdicom wraps accepted sockets in the listener's one thread, so a failed handshake vanished
    without a word, and a peer that connected and sent nothing held up every other connection. The
    handshake runs instead in the connection's own thread (EVT_CONN_OPEN, :meth:`StorageSCP._handshake`).
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context

    def wrap_socket(self, sock: socket.socket, server_side: bool = True, **_: Any) -> ssl.SSLSocket:
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
