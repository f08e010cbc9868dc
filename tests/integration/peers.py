"""Real peers for the node's integration tests: dcmtk processes, small MR series, tiny file systems."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from tests.tools import dcmtk

#: pydicom's bundled 64×64 MR image (16-bit, explicit VR little endian, about 10 kB).
MR_SMALL = Path(get_testdata_file("MR_small.dcm"))
#: pydicom's bundled CT image: a storage class the node does not accept by default.
CT_SMALL = Path(get_testdata_file("CT_small.dcm"))

_STATUS_RE = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")


def make_mr_series(
    folder: Path, count: int, series_uid: str | None = None, first_number: int = 1, **attributes: object
) -> list[Path]:
    """``count`` MR_small copies in one series (new SOP instance UIDs), written to ``folder``.

    Each copy is moved 1 mm along the slice normal per instance number, so the series is one volume.
    """
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(MR_SMALL)
    orientation = [float(v) for v in template.ImageOrientationPatient]
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.array([float(v) for v in template.ImagePositionPatient])
    series_uid = series_uid or generate_uid(prefix=None)
    paths = []
    for number in range(first_number, first_number + count):
        ds = template.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(prefix=None)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + number * normal]
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(
    port: int,
    files: Sequence[Path],
    calling: str = "STORESCU",
    called: str = "IANNODE",
    options: Sequence[str] = (),
) -> tuple[subprocess.CompletedProcess[str], list[int]]:
    """Send ``files`` in one association with dcmtk's storescu (not halting on a failed store).

    Returns the process and the DIMSE status of every C-STORE response, in order.
    """
    args = [dcmtk("storescu"), "-d", "-nh", *options, "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
    proc = subprocess.run(args + [str(f) for f in files], capture_output=True, text=True, timeout=120)
    statuses = [int(code, 16) for code in _STATUS_RE.findall(proc.stdout + proc.stderr)]
    return proc, statuses


def echoscu(port: int, calling: str = "ECHOSCU", called: str = "IANNODE") -> subprocess.CompletedProcess[str]:
    args = [dcmtk("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@contextmanager
def storescp(folder: Path, port: int, ae_title: str = "DEST") -> Iterator[subprocess.Popen[bytes]]:
    """dcmtk's storescp writing to ``folder`` (TCP_NODELAY=1: without it Debian's build stalls ~40 ms)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TCP_NODELAY": "1"}
    args = [dcmtk("storescp"), "-aet", ae_title, "-od", str(folder), "+xa", str(port)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def tiny_tmpfs(size_kib: int) -> Iterator[Path]:
    """A real, tiny tmpfs mount (so writes end in ENOSPC); skips when this machine forbids mounting."""
    mountpoint = Path(tempfile.mkdtemp(prefix="ian-node-tmpfs-"))
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        mountpoint.rmdir()
        pytest.skip(f"cannot mount a tmpfs to fill a disk for real (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
        mountpoint.rmdir()


def send_raw(port: int, paths: Sequence[Path], called: str = "IANNODE") -> list[int]:
    """C-STORE each file's bytes as they are, one association: pynetdicom reads only the file meta, so a
    truncated, over-nested or otherwise broken data set reaches the node as a PACS would send it."""
    ae = AE(ae_title="RAWSCU")
    for sop_class in {str(read_file_meta_info(p).MediaStorageSOPClassUID) for p in paths}:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    before = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        assert assoc.is_established
        try:
            return [int(assoc.send_c_store(p).get("Status", -1)) for p in paths]
        finally:
            assoc.release()
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = before
