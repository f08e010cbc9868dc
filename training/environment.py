"""What a training run ran on, and torch's deterministic mode with the operations it could not make deterministic.

`RunEnvironment` is recorded for every training session and every evaluation of a run (the run's
`config.json`, `checkpoint_latest.pt`, `result.json`, the ledger's run record and `summary.json`): the
GPU (or "cpu"), CUDA and cuDNN versions, AMP, torch and Python versions, the deterministic mode, the
CPU threads and the operations that ran without a deterministic implementation.

`Determinism(True)` switches torch to deterministic algorithms for the duration of a block: cuDNN
deterministic kernels without autotuning, `torch.use_deterministic_algorithms(True, warn_only=True)`
and `CUBLAS_WORKSPACE_CONFIG=:4096:8` (deterministic cuBLAS; it must be set before the first cuBLAS
call of the process, so `train_benchmark` sets it at start-up through `configure_cublas`). Every
operation that has a deterministic implementation uses it, exactly as with `warn_only=False`;
`warn_only` only changes what happens at an operation that has none. `warn_only=False` would abort
those, and the paper's own network meets one on every device (`max_unpool2d`, which torch flags
whatever the indices), so such operations run and each is named in `nondeterministic_ops` instead.
The list for the seven networks, and why each is harmless or not, is in docs/benchmark.md.
The block restores torch's previous settings on exit, so the mode never leaks into other code.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import sys
import warnings
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import torch

logger = logging.getLogger(__name__)

CUBLAS_WORKSPACE = ":4096:8"
_NONDETERMINISTIC = re.compile(r"^(\S+) does not have a deterministic implementation")


@dataclass(frozen=True)
class RunEnvironment:
    """The hardware, software and settings one training session (or evaluation) of a run used."""

    device: str  # the torch device: "cpu", "cuda:0", ...
    gpu: str  # the GPU's name, or "cpu"
    cuda: str | None  # CUDA version torch was built with (None: a CPU build)
    cudnn: int | None  # cuDNN version (None where torch has none)
    torch: str
    python: str
    amp: bool  # mixed precision actually used (only ever on CUDA)
    deterministic: bool
    threads: int  # torch CPU threads
    cublas_workspace_config: str | None
    platform: str
    nondeterministic_ops: tuple[str, ...] = ()  # ops met that have no deterministic implementation

    @classmethod
    def current(cls, device: torch.device, amp: bool, deterministic: bool,
                nondeterministic_ops: tuple[str, ...] = ()) -> RunEnvironment:
        """This process's environment for a run on `device`."""
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return cls(str(device), gpu, torch.version.cuda, cudnn, str(torch.__version__), sys.version.split()[0],
                   amp, deterministic, torch.get_num_threads(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                   platform.platform(), tuple(sorted(nondeterministic_ops)))

    def with_ops(self, ops: tuple[str, ...] | set[str]) -> RunEnvironment:
        return replace(self, nondeterministic_ops=tuple(sorted(set(self.nondeterministic_ops) | set(ops))))

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "nondeterministic_ops": list(self.nondeterministic_ops)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunEnvironment:
        return cls(**{**data, "nondeterministic_ops": tuple(data.get("nondeterministic_ops", ()))})


#: The ops already warned about in this process (each block still records its own in `ops`).
_WARNED: set[str] = set()


def configure_cublas() -> None:
    """Ask cuBLAS for its deterministic workspace; call before the process's first CUDA matrix product."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


class Determinism:
    """Deterministic torch for a block when `enabled` (a no-op otherwise); `ops` collects the operations met
    that have no deterministic implementation (torch's own names, e.g. ``max_unpooling2d_forward_out``)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.ops: set[str] = set()
        self._saved: tuple[bool, bool, bool, bool] | None = None
        self._warnings: warnings.catch_warnings | None = None  # type: ignore[type-arg]

    def __enter__(self) -> Determinism:
        if not self.enabled:
            return self
        if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                logger.warning("CUBLAS_WORKSPACE_CONFIG set after CUDA started: cuBLAS may not be deterministic "
                               "(set it before the process starts, or run through train_benchmark)")
            configure_cublas()
        self._saved = (torch.are_deterministic_algorithms_enabled(),
                       torch.is_deterministic_algorithms_warn_only_enabled(),
                       torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        # "always": every occurrence reaches the hook, not only the first per code location of the process
        warnings.filterwarnings("always", message=".* does not have a deterministic implementation")
        shown = warnings.showwarning

        def record(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   file: Any = None, line: str | None = None) -> None:
            match = _NONDETERMINISTIC.match(str(message))
            if match is None:
                shown(message, category, filename, lineno, file, line)
            elif match.group(1) not in self.ops:
                self.ops.add(match.group(1))
                level = logging.INFO if match.group(1) in _WARNED else logging.WARNING  # once per process
                _WARNED.add(match.group(1))
                logger.log(level, "%s has no deterministic implementation in torch; run continues (recorded)",
                           match.group(1))

        warnings.showwarning = record
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._warnings is not None:
            self._warnings.__exit__(exc_type, exc, tb)
            self._warnings = None
        if self._saved is not None:
            enabled, warn_only, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = self._saved
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
            self._saved = None
