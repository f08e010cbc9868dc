"""Network helpers shared by stages that must not import each other: HTTP sessions and free ports."""

from __future__ import annotations

import socket

import requests

from ian_node.config import OrthancTarget, StowRsTarget


def http_session(config: StowRsTarget | OrthancTarget) -> requests.Session:
    """A requests session carrying the target's basic-auth credentials or bearer token."""
    session = requests.Session()
    if config.username is not None:
        session.auth = (config.username, config.password or "")
    if config.token is not None:
        session.headers["Authorization"] = f"Bearer {config.token}"
    return session


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (for the demo, tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
