"""Helpers the tests share: the real dcmtk / dicom3tools binaries and free loopback ports."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

#: dcmtk lives in /usr/bin. pynetdicom installs Python shims named storescu/echoscu/findscu that
#: shadow dcmtk on PATH, so the tests always call dcmtk by absolute path.
DCMTK_DIR = Path("/usr/bin")


def dcmtk(name: str) -> str:
    """Absolute path of a dcmtk tool; fails the test clearly when `make test` has not installed it."""
    path = DCMTK_DIR / name
    if not path.exists():
        pytest.fail(f"dcmtk's {name} is missing at {path}: run `make test`, which installs dcmtk")
    return str(path)


def dciodvfy_errors(path: Path) -> list[str]:
    """The 'Error' lines dciodvfy prints for one file (warnings are not errors)."""
    exe = Path("/usr/bin/dciodvfy")
    if not exe.exists():
        pytest.fail("dciodvfy is missing: run `make test`, which installs dicom3tools")
    # dciodvfy echoes value bytes as they are (Latin-1 names included): decode without failing on them
    proc = subprocess.run([str(exe), str(path)], capture_output=True, text=True, errors="replace", timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]
