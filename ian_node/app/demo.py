"""`ian-node demo`: the whole node on one phantom study, on loopback, with real DICOM peers.

1. make a phantom study (MR series + ground-truth SEG);
2. start a C-STORE listener standing in for the PACS, and the node, on free ports;
3. send the series to the node with a real SCU (pynetdicom, one association);
4. wait for the node's SEG and its TID 1500 SR to arrive at the listener;
5. validate the SEG (highdicom read-back, and dciodvfy when installed) and report per-stage timings,
   each side's crop (mode, box, localiser confidence), the DSC against the phantom's ground truth,
   and each side's QA verdict and the SR's measurements (length, volume, diameters).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage

from ian_node.app.node import Node
from ian_node.config import (
    ApiConfig,
    CropConfig,
    DicomConfig,
    DicomTarget,
    ExportConfig,
    ModelConfig,
    NodeConfig,
    SeriesConfig,
    StorageConfig,
)
from ian_node.net import free_port
from ian_node.phantom.study import PhantomConfig, generate_phantom, phantom_preset, write_phantom
from ian_node.segment.seg import read_segmentation_labels
from ian_node.segment.volume import Side
from ian_node.storage.records import JobState

logger = logging.getLogger(__name__)

PACS_AE = "DEMOPACS"
SENDER_AE = "DEMOSCU"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """DSC of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


@dataclass
class DemoReport:
    phantom_dir: Path
    seg_path: Path | None = None
    sr_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    dsc: dict[str, float] = field(default_factory=dict)
    voxels: dict[str, tuple[int, int]] = field(default_factory=dict)  # side -> (predicted, ground truth)
    dciodvfy_errors: list[str] | None = None
    model_label: str = ""
    #: The crop the node used per side, as its job records it: {"mode", "box_mm", "confidence"}.
    crop: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Each side's QA as the job records it (`ian_node.segment.qa.SideQA.as_json`).
    qa: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Each side's whole-tract figures read back from the SR (`sr_measurements`).
    measurements: dict[str, dict[str, float]] = field(default_factory=dict)

    def format(self) -> str:
        lines = [f"phantom study: {self.phantom_dir}", f"SEG received: {self.seg_path}", f"SR received: {self.sr_path}"]
        if self.model_label:
            lines.append(f"model: {self.model_label}")
        lines.append("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in self.timings.items()))
        for side, value in self.dsc.items():
            pred, gt = self.voxels[side]
            lines.append(f"{side:5s} IAN: DSC {value:.3f} against ground truth ({pred} predicted / {gt} true voxels)"
                         + (f"; crop {crop_text(self.crop[side])}" if side in self.crop else ""))
            if side in self.qa:
                lines.append(f"      QA {qa_text(self.qa[side])}; SR {measurement_text(self.measurements.get(side))}")
        if self.dciodvfy_errors is None:
            lines.append("dciodvfy: not installed (make test installs dicom3tools); highdicom read-back passed")
        else:
            lines.append(f"dciodvfy: {len(self.dciodvfy_errors)} error(s)" + "".join("\n  " + e for e in self.dciodvfy_errors))
        return "\n".join(lines)


def crop_text(crop: dict[str, Any]) -> str:
    """One side's crop as recorded: "auto x [-60.1, -12.0] y [...] z [...] mm, confidence 0.91"."""
    box = crop.get("box_mm")
    ranges = "no box" if box is None else " ".join(
        f"{axis} [{lo:.1f}, {hi:.1f}]" for axis, (lo, hi) in zip("xyz", box, strict=True)) + " mm"
    confidence = crop.get("confidence")
    return f"{crop.get('mode')} {ranges}" + ("" if confidence is None else f", confidence {confidence:.2f}")


def qa_text(qa: dict[str, Any]) -> str:
    """One side's verdict and its reasons: "WARN (tract 26 mm long, outside 45-75 mm)"."""
    return qa["verdict"] + (f" ({'; '.join(qa['reasons'])})" if qa.get("reasons") else "")


def measurement_text(figures: dict[str, float] | None) -> str:
    """One side's SR figures: "length 45.2 mm, volume 120 mm3, diameter mean 2.4 / min 1.9 mm"."""
    if not figures:
        return "no measurements (no voxels)"
    text = f"length {figures['length_mm']:.1f} mm, volume {figures['volume_mm3']:.0f} mm3"
    if "mean_diameter_mm" in figures:
        text += f", diameter mean {figures['mean_diameter_mm']:.1f}"
        text += f" / min {figures['min_diameter_mm']:.1f} mm" if "min_diameter_mm" in figures else " mm"
    return text


def sr_measurements(path: Path) -> dict[str, dict[str, float]]:
    """Each side's whole-tract figures read back from a TID 1500 SR (the groups' measurements
    without a finding site of their own; the per-region ones have one): {"right": {"length_mm", ...}}."""
    names = {(codes.SCT.Length.value, None): "length_mm", (codes.SCT.Volume.value, None): "volume_mm3",
             (codes.SCT.Diameter.value, codes.SCT.Mean.value): "mean_diameter_mm",
             (codes.SCT.Diameter.value, codes.SCT.Minimum.value): "min_diameter_mm"}
    out: dict[str, dict[str, float]] = {}
    for group in hd.sr.srread(path).content.get_volumetric_roi_measurement_groups():
        side = str(group.tracking_identifier).rsplit(" ", 1)[-1]  # "Inferior alveolar nerve, right"
        for m in group.get_measurements():
            key = names.get((m.name.value, m.derivation.value if m.derivation else None))
            if key and not m.finding_sites:
                out.setdefault(side, {})[key] = float(m.value)
    return out


class _Listener:
    """A C-STORE SCP standing in for the PACS: keeps the first SEG and the first SR it receives."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.received = threading.Event()
        self.path: Path | None = None
        self.sr_path: Path | None = None
        self.port = free_port()
        ae = AE(ae_title=PACS_AE)
        ae.add_supported_context(SegmentationStorage)
        ae.add_supported_context(Comprehensive3DSRStorage)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        path = self.out / f"{event.request.AffectedSOPInstanceUID}.dcm"
        path.write_bytes(event.encoded_dataset())
        if event.request.AffectedSOPClassUID == SegmentationStorage:
            self.path = self.path or path
        else:
            self.sr_path = self.sr_path or path
        if self.path and self.sr_path:
            self.received.set()
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


def send_series(paths: list[Path], port: int, called_ae: str) -> None:
    """C-STORE every file over one association; raise if any is not stored."""
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"the node at 127.0.0.1:{port} did not accept the association")
    try:
        for path in paths:
            status = assoc.send_c_store(dcmread(path))
            if getattr(status, "Status", None) != 0x0000:
                raise RuntimeError(f"the node did not store {path.name}: {status}")
    finally:
        assoc.release()


def run_demo(out: Path, seed: int = 0, patient: int = 0, phantom: PhantomConfig | None = None,
             checkpoint: Path | None = None, timeout_s: float = 900.0, crop: CropConfig | None = None) -> DemoReport:
    """Run the whole demo in `out`; returns what it measured. `crop`: the node's ``[crop]`` (default: its defaults)."""
    out.mkdir(parents=True, exist_ok=True)
    study = generate_phantom(patient, seed, phantom or phantom_preset("demo"))  # life size: the localiser finds it
    files = write_phantom(study, out / "phantom")
    report = DemoReport(phantom_dir=files.root)
    received = out / "pacs"
    received.mkdir(exist_ok=True)
    listener = _Listener(received)
    config = NodeConfig(
        dicom=DicomConfig(port=free_port()),
        api=ApiConfig(port=0),  # any free port: the demo may run beside a serving node
        # The demo writes a few MiB: keep 64 MiB free rather than the service default, so it runs on a full laptop.
        storage=StorageConfig(spool_dir=out / "node" / "spool", state_path=out / "node" / "state.sqlite3",
                              min_free_bytes=64 << 20, min_free_percent=0.0),
        series=SeriesConfig(quiet_period_s=1.0),
        export=ExportConfig(targets=(DicomTarget(name="pacs", ae_title=PACS_AE, host="127.0.0.1", port=listener.port),)),
        model=ModelConfig(checkpoint=checkpoint),
        crop=crop or CropConfig(),
    )
    node = Node(config)
    try:
        node.start()
        report.model_label = node.worker.predictor.checkpoint.meta.label  # load before timing the send
        t0 = time.perf_counter()
        send_series(list(files.instances), node.scp.port, config.dicom.ae_title)
        t1 = time.perf_counter()
        _wait_for_seg(node, listener, timeout_s)
        t2 = time.perf_counter()
        totals = node.worker.totals
        job = node.state.list_jobs(limit=1)[0]
        report.crop = dict(job.crop or {})
        report.qa = {q["side"]: q for q in job.qa or ()}
    finally:
        node.stop()
        listener.stop()
    report.seg_path, report.sr_path = listener.path, listener.sr_path
    report.timings = {"send": t1 - t0, "turnaround": t2 - t1,
                      **{k: v / max(totals.jobs, 1) for k, v in totals.seconds.items()}}
    _validate(report, study.labels, list(files.instances))
    return report


def _wait_for_seg(node: Node, listener: _Listener, timeout_s: float) -> None:
    """Until the SEG and the SR arrive; a failed job (e.g. "no mandible region found") ends the wait with its error."""
    deadline = time.monotonic() + timeout_s
    while not listener.received.wait(0.2):
        failed = [j for j in node.state.list_jobs() if j.state is JobState.FAILED]
        if failed:
            crop = "".join(f"; {side} crop {crop_text(c)}" for side, c in (failed[0].crop or {}).items())
            raise RuntimeError(f"job {failed[0].id} failed: {failed[0].error}{crop}")
        if time.monotonic() > deadline:
            jobs = node.state.list_jobs()
            raise RuntimeError(f"no SEG and SR within {timeout_s:.0f} s; jobs: {[(j.id, j.state, j.error) for j in jobs]}")


def _validate(report: DemoReport, truth: np.ndarray, source_paths: list[Path]) -> None:
    if report.seg_path is None or report.sr_path is None:
        raise RuntimeError("no SEG and SR were received")
    report.measurements = sr_measurements(report.sr_path)
    seg = hd.seg.segread(report.seg_path)
    labels = read_segmentation_labels(seg, [dcmread(p) for p in source_paths])
    for side in Side:
        pred, gt = labels == side.label, truth == side.label
        report.dsc[side.value] = dice(pred, gt)
        report.voxels[side.value] = (int(pred.sum()), int(gt.sum()))
    exe = shutil.which("dciodvfy")
    if exe:
        proc = subprocess.run([exe, str(report.seg_path)], capture_output=True, text=True, timeout=120)
        report.dciodvfy_errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]
