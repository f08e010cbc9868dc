"""A real Orthanc (Debian's /usr/sbin/Orthanc) for tests: generated config, free loopback ports, stopped after.

Orthanc 1.10 cannot bind its HTTP port to loopback only, so the generated config keeps
``RemoteAccessAllowed`` false and authentication on. Stopping waits for the process to exit, so a
new server may reuse the same storage folder right away.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from ian_node.net import free_port

ORTHANC = Path("/usr/sbin/Orthanc")
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = PLUGIN_DIR / "libOrthancDicomWeb.so"
PYTHON_PLUGIN = PLUGIN_DIR / "libOrthancPython.so"


@dataclass(frozen=True)
class OrthancServer:
    """A running Orthanc: its REST root, DICOM port and AE title, and the credentials it requires."""

    url: str
    dicom_port: int
    aet: str
    username: str
    password: str
    root: Path
    process: subprocess.Popen[bytes]

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(f"{self.url}{path}", auth=self.auth, timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(f"{self.url}{path}", auth=self.auth, timeout=30, **kwargs)

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc's ID of the instance with this SOP Instance UID, or None when it is not stored."""
        response = self.post("/tools/lookup", data=sop_instance_uid)
        response.raise_for_status()
        ids = [item["ID"] for item in response.json() if item.get("Type") == "Instance"]
        return ids[0] if ids else None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_text(self) -> str:
        """Everything this server (and earlier ones on the same root) logged."""
        log = self.root / "orthanc.log"
        return log.read_text(errors="replace") if log.exists() else ""


@contextmanager
def orthanc_server(
    root: Path,
    plugins: Sequence[Path] = (DICOMWEB_PLUGIN,),
    extra_config: Mapping[str, Any] | None = None,
    aet: str = "ORTHANC",
    startup_timeout: float = 60.0,
    verbose: bool = False,
) -> Iterator[OrthancServer]:
    """Start Orthanc with storage under ``root`` (kept between runs) and stop it afterwards.

    ``verbose`` adds Orthanc's ``--verbose`` so that info-level plugin messages reach the log.
    """
    if not ORTHANC.exists():
        pytest.fail(f"Orthanc is missing at {ORTHANC}: run `make test`, which installs it")
    for plugin in plugins:
        if not plugin.exists():
            pytest.fail(f"Orthanc plugin {plugin} is missing: run `make test`, which installs it")
    root.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    username, password = "ian-node-test", "test-password-7f3a"
    config: dict[str, Any] = {
        "Name": "ian-node-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {username: password},
        "Plugins": [str(p) for p in plugins],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "HttpDescribeErrors": True,
        "ConcurrentJobs": 1,
    }
    config.update(extra_config or {})
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    with (root / "orthanc.log").open("ab") as log:
        args = [str(ORTHANC), *(["--verbose"] if verbose else []), str(config_path)]
        # TCP_NODELAY=1: Debian's DCMTK otherwise stalls about 40 ms per instance Orthanc sends on
        # loopback (measured: 24 instances to the node in 1.1 s without, 0.15 s with).
        env = {**os.environ, "TCP_NODELAY": "1"}
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = OrthancServer(
        url=f"http://127.0.0.1:{http_port}", dicom_port=dicom_port, aet=aet, username=username,
        password=password, root=root, process=process,
    )
    try:
        _wait_until_up(server, startup_timeout)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_up(server: OrthancServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"Orthanc exited with {server.process.returncode} at start-up:\n{server.log_tail()}")
        try:
            if server.get("/system").status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    pytest.fail(f"Orthanc did not answer within {timeout} s:\n{server.log_tail()}")
