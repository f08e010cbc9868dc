"""From a checkpoint to a result SEG: the node's model loading and the SEG of one series version.

Shared by the worker and ``ian-node predict``, so a file-in/SEG-out run builds exactly what the node
would send. SEG UIDs are derived from (source series, series version, model hash), so a job re-run
after a crash produces the same SEG instance and a PACS sees one result per version.
"""

from __future__ import annotations

import logging

import torch
from pydicom.dataset import Dataset

from ian_node import __version__
from ian_node.config import ModelConfig
from ian_node.segment.pipeline import PipelineResult
from ian_node.segment.seg import AlgorithmInfo, build_segmentation
from ian_node.uids import derived_uid
from model.checkpoint import BUNDLED_CHECKPOINT, LoadedCheckpoint, load_checkpoint
from model.predictor import Predictor, PredictorOptions

logger = logging.getLogger(__name__)

#: Result series numbers are this plus the source series version, so each version is told apart.
SEG_SERIES_NUMBER_BASE = 9000


def load_predictor(config: ModelConfig) -> Predictor:
    """The configured checkpoint (or the bundled phantom model) on the configured device."""
    path = config.checkpoint or BUNDLED_CHECKPOINT
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    checkpoint = load_checkpoint(path)
    predictor = Predictor(checkpoint, PredictorOptions(device=config.device, batch_size=config.batch_size))
    logger.info(
        "model %s (%s, sha256 %s) on %s%s",
        checkpoint.meta.architecture, checkpoint.meta.variant, checkpoint.sha256[:12], predictor.device,
        f" [{checkpoint.meta.label}]" if checkpoint.meta.label else "",
    )
    return predictor


def algorithm_info(checkpoint: LoadedCheckpoint) -> AlgorithmInfo:
    meta = checkpoint.meta
    params = {"architecture": meta.architecture, "variant": meta.variant, "input_size": str(meta.input.size)}
    if meta.label:
        params["label"] = meta.label
    return AlgorithmInfo(name=f"ian-node {meta.architecture}", version=__version__,
                         checkpoint_hash=checkpoint.sha256, parameters=params)


def result_segmentation(result: PipelineResult, version: int, checkpoint: LoadedCheckpoint) -> Dataset:
    """The SEG of one series version, with UIDs that are the same every time it is rebuilt."""
    entropy = [result.series.series_uid, str(version), checkpoint.sha256]
    return build_segmentation(
        result.series,
        result.labels,
        algorithm=algorithm_info(checkpoint),
        series_number=SEG_SERIES_NUMBER_BASE + version,
        series_description=f"IAN segmentation (AI) v{version}",
        series_instance_uid=derived_uid(None, "ian-node-result", *entropy, "series"),
        sop_instance_uid=derived_uid(None, "ian-node-result", *entropy, "instance"),
    )
