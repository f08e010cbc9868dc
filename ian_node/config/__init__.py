"""The node's typed configuration: TOML file, then environment overrides, validated at start-up.

A node runs with no file at all. The sections and their defaults (frozen pydantic dataclasses):
:mod:`ian_node.config.sections`; the file and the ``IAN_NODE_<SECTION>_<KEY>`` overrides (read by
pydantic-settings): :mod:`ian_node.config.loading`; the export targets: :mod:`ian_node.config.targets`;
the shared checks: :mod:`ian_node.config.fields`.
"""

from ian_node.config.loading import load_config
from ian_node.config.sections import (
    BASE_SOP_CLASSES,
    CROP_MODES,
    DEFAULT_DATA_DIR,
    ENV_CONFIG_FILE,
    ENV_PREFIX,
    SECTIONS,
    ApiConfig,
    CallingAE,
    ConfigError,
    CropConfig,
    DicomConfig,
    ExpectedCount,
    ModelConfig,
    NodeConfig,
    OutputConfig,
    QaConfig,
    SeriesConfig,
    StorageConfig,
    TlsConfig,
    check_box,
    check_box_pair,
)
from ian_node.config.targets import (
    TARGET_CONFIG_TYPES,
    DicomTarget,
    ExportConfig,
    OrthancTarget,
    SenderAE,
    SenderTarget,
    StowRsTarget,
    TargetConfig,
)

__all__ = [
    "BASE_SOP_CLASSES", "CROP_MODES", "DEFAULT_DATA_DIR", "ENV_CONFIG_FILE", "ENV_PREFIX", "SECTIONS", "TARGET_CONFIG_TYPES",
    "ApiConfig", "CallingAE", "ConfigError", "CropConfig", "DicomConfig", "DicomTarget", "ExpectedCount", "ExportConfig", "ModelConfig",
    "NodeConfig", "OrthancTarget", "SenderAE", "SenderTarget", "OutputConfig", "QaConfig", "SeriesConfig", "StorageConfig", "StowRsTarget", "TargetConfig", "TlsConfig",
    "check_box", "check_box_pair", "load_config",
]
