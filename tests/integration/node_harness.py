"""What the node's end-to-end tests share: a small untrained checkpoint, small phantoms, a running node.

An untrained IAN-Net at width 0.125 and 64 px input is enough for plumbing: the masks it predicts are
meaningless, but the SEG it yields is a real, valid DICOM Segmentation of the source series.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
import torch

from ian_node.app.node import Node
from ian_node.config import ApiConfig, CropConfig, DicomConfig, ModelConfig, NodeConfig, SeriesConfig, StorageConfig
from ian_node.phantom.study import PhantomConfig, PhantomFiles, generate_phantom, write_phantom
from model import registry
from model.checkpoint import CheckpointMeta, InputContract, save_checkpoint

T = TypeVar("T")

#: Small enough for a 2-core CI machine; big enough for the volume and SEG code to be exercised.
SMALL_PHANTOM = PhantomConfig(shape=(24, 96, 96))


def untrained_checkpoint(path: Path, size: int = 64, attention: bool = True, seed: int = 0) -> Path:
    """A real checkpoint file of an untrained, narrow IAN-Net (seeded, so always the same).

    ``attention=False`` with ``size=32`` is 2-3x faster on a CPU: a job in seconds, marking (nearly)
    every voxel of each side, which is all that plumbing tests need.
    """
    torch.manual_seed(seed)
    net = registry.build("ian_net", width=0.125, attention=attention)
    meta = CheckpointMeta(architecture="ian_net", width=0.125, options={"attention": attention}, variant=net.variant,
                          input=InputContract(size=size, in_channels=1), label="untrained test model",
                          training={"epochs": 0})
    save_checkpoint(path, net, meta)
    return path


def small_phantom(folder: Path, patient: int = 0, seed: int = 7) -> PhantomFiles:
    """Patient ``patient`` of ``seed`` as a small phantom study (each patient has its own UIDs)."""
    return write_phantom(generate_phantom(patient, seed, SMALL_PHANTOM), folder)


def node_config(root: Path, checkpoint: Path, **sections: Any) -> NodeConfig:
    """A node on free loopback ports (0) with its data under ``root``, cropping halves; ``sections`` replace defaults."""
    base = NodeConfig(
        dicom=DicomConfig(port=0),
        api=ApiConfig(port=0),
        # tests write little: they must not depend on how full the machine's disk is
        storage=StorageConfig(spool_dir=root / "spool", state_path=root / "state.sqlite3", min_free_bytes=64 << 20,
                              min_free_percent=0.0),
        series=SeriesConfig(quiet_period_s=1.0),
        model=ModelConfig(checkpoint=checkpoint, device="cpu"),
        # the untrained checkpoint records no crop (trained on halves, as far as the node knows)
        crop=CropConfig(mode="half"),
    )
    return replace(base, **sections)


@pytest.fixture(scope="module")
def dcmtk_nodelay() -> Iterator[None]:
    """TCP_NODELAY=1 for the dcmtk tools a module starts: Debian's build otherwise stalls ~40 ms per C-STORE."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TCP_NODELAY", "1")
        yield


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """One intra-op thread while inside: on a busy 2-core machine, two OpenMP threads spin against other
    processes and made the untrained model's inference about 15 times slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def running_node(config: NodeConfig) -> Iterator[Node]:
    node = Node(config)
    with single_torch_thread():
        node.start()
        try:
            yield node
        finally:
            node.stop()


def api_url(node: Node) -> str:
    return f"http://127.0.0.1:{node.api.port}"


def post_json(url: str, payload: Any, token: str | None = None, timeout: float = 120) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(url, data=json.dumps(payload), headers=headers, timeout=timeout)


def wait_for(condition: Callable[[], T], timeout: float, what: str | Callable[[], str], interval: float = 0.05) -> T:
    """Poll until ``condition()`` is truthy and return its value; fail naming ``what`` (called for
    the current state when it is a function) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what() if callable(what) else what}")
        time.sleep(interval)
