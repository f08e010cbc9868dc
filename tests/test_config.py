"""The node's config: defaults with no file, TOML, environment overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ian_node.config import (
    CallingAE,
    ConfigError,
    DicomTarget,
    ExportConfig,
    OrthancTarget,
    SenderTarget,
    StorageConfig,
    StowRsTarget,
    load_config,
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ian-node.toml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str = "", env: dict[str, str] | None = None) -> ConfigError:
    path = _write(tmp_path, text) if text else None
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env or {})
    return info.value


def test_defaults_run_with_no_file_and_no_environment() -> None:
    cfg = load_config(None, environ={})
    assert (cfg.dicom.ae_title, cfg.dicom.port, cfg.dicom.bind) == ("IANNODE", 11112, "127.0.0.1")
    assert cfg.series.quiet_period_s == 10.0
    assert cfg.model.checkpoint is None
    assert cfg.storage.spool_dir == Path("ian-node-data/spool")
    assert cfg.storage.state_path == Path("ian-node-data/state.sqlite3")
    assert (cfg.storage.min_free_bytes, cfg.storage.min_free_percent) == (1024**3, 5.0)
    assert cfg.dicom.sop_classes == ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1")
    assert cfg.api.bind == "127.0.0.1" and cfg.api.token is None
    assert cfg.export.targets == () and not cfg.tls.enabled


def test_toml_file_sets_every_section(tmp_path: Path) -> None:
    path = _write(tmp_path, """
[dicom]
ae_title = "NODE1"
port = 104
bind = "0.0.0.0"
allowed_calling_aes = ["PACS", { ae_title = "ORTHANC", host = "10.0.0.7" }]
extra_sop_classes = ["1.2.840.10008.5.1.4.1.1.2"]

[storage]
spool_dir = "/var/lib/ian-node/spool"

[series]
quiet_period_s = 3
description_pattern = "neuro|MRN"
min_slices = 20
retention = "purge"

[export]
max_attempts = 3

[[export.targets]]
kind = "dicom"
name = "pacs"
ae_title = "PACS"
host = "10.0.0.2"
port = 11112

[[export.targets]]
kind = "sender"
name = "sender"
senders = [{ ae_title = "MODALITY1", host = "10.0.0.9", port = 4242 }]

[[export.targets]]
kind = "stowrs"
name = "web"
url = "http://127.0.0.1:8042/dicom-web"
username = "ian"
password = "secret"

[[export.targets]]
kind = "orthanc"
name = "orthanc"
url = "http://127.0.0.1:8042"
token = "abc"

[api]
port = 9000
token = "0123456789abcdef0123"
""")
    cfg = load_config(path, environ={})
    assert cfg.dicom.ae_title == "NODE1" and cfg.dicom.port == 104 and cfg.dicom.bind == "0.0.0.0"
    assert cfg.dicom.allowed_calling_aes == (CallingAE(ae_title="PACS"), CallingAE(ae_title="ORTHANC", host="10.0.0.7"))
    assert "1.2.840.10008.5.1.4.1.1.2" in cfg.dicom.sop_classes
    assert cfg.storage.spool_dir == Path("/var/lib/ian-node/spool")
    assert cfg.storage.state_path == Path("ian-node-data/state.sqlite3")
    assert cfg.series.quiet_period_s == 3.0 and cfg.series.retention == "purge"
    kinds = [type(t) for t in cfg.export.targets]
    assert kinds == [DicomTarget, SenderTarget, StowRsTarget, OrthancTarget]
    assert cfg.export.targets[1].senders[0].port == 4242 and cfg.export.max_attempts == 3
    assert cfg.api.port == 9000


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[dicom]\nport = 104\n[series]\nmodalities = ['MR']\n")
    env = {
        "IAN_NODE_DICOM_PORT": "11113",
        "IAN_NODE_SERIES_QUIET_PERIOD_S": "0.5",
        "IAN_NODE_SERIES_MODALITIES": "MR, OT",
        "IAN_NODE_DICOM_ALLOWED_CALLING_AES": '[{ae_title = "A", host = "127.0.0.1"}]',
        "IAN_NODE_EXPORT_TARGETS": '[{kind = "orthanc", name = "o", url = "http://127.0.0.1:8042"}]',
        "IAN_NODE_MODEL_DEVICE": "cuda:1",
        "IAN_NODE_CONFIG": str(path),  # reserved for the CLI: not a key
        "OTHER_VARIABLE": "ignored",
    }
    cfg = load_config(path, environ=env)
    assert cfg.dicom.port == 11113
    assert cfg.series.quiet_period_s == 0.5
    assert cfg.series.modalities == ("MR", "OT")
    assert cfg.dicom.allowed_calling_aes == (CallingAE(ae_title="A", host="127.0.0.1"),)
    assert cfg.export.targets[0].name == "o" and cfg.model.device == "cuda:1"


def test_empty_environment_value_clears_an_optional_key(tmp_path: Path) -> None:
    path = _write(tmp_path, '[api]\ntoken = "0123456789abcdef0123"\n')
    assert load_config(path, environ={"IAN_NODE_API_TOKEN": ""}).api.token is None


@pytest.mark.parametrize(
    ("text", "env", "key", "reason"),
    [
        ("[dicom]\nport = 70000\n", {}, "dicom.port", "less than or equal to 65535"),
        ('[dicom]\nport = "104"\n', {}, "dicom.port", "must be a valid integer"),
        ("[dicom]\nprot = 104\n", {}, "dicom.prot", "unknown key"),
        ("[dicomm]\nport = 104\n", {}, "dicomm", "unknown key"),
        ('[dicom]\nae_title = "THIS-TITLE-IS-TOO-LONG"\n', {}, "dicom.ae_title", "1 to 16"),
        ('[dicom]\nallowed_calling_aes = [{ae_title = "A", host = "pacs.local"}]\n', {},
         "dicom.allowed_calling_aes[0].host", "IP address"),
        ('[dicom]\nextra_sop_classes = ["1.2.840.10008.1.1"]\n', {}, "dicom.extra_sop_classes", "not a storage"),
        ('[series]\ndescription_pattern = "("\n', {}, "series.description_pattern", "regular expression"),
        ('[series]\nretention = "archive"\n', {}, "series.retention", "must be 'keep' or 'purge'"),
        ("[series]\nquiet_period_s = 0\n", {}, "series.quiet_period_s", "greater than 0"),
        ("[series]\nmin_slices = 1\n", {}, "series.min_slices", "greater than or equal to 2"),
        ('[tls]\ncert = "/nonexistent/cert.pem"\nkey = "/nonexistent/key.pem"\n', {}, "tls.cert", "does not exist"),
        ('[tls]\nca = "/nonexistent/ca.pem"\n', {}, "tls.ca", "needs cert and key"),
        ('[model]\ndevice = "tpu"\n', {}, "model.device", "must match pattern '^(auto|cpu|mps|cuda"),
        ('[[export.targets]]\nkind = "ftp"\nname = "x"\n', {}, "export.targets[0].kind", "one of"),
        ('[[export.targets]]\nkind = "dicom"\nae_title = "PACS"\nhost = "1.2.3.4"\n', {},
         "export.targets[0].name", "required"),
        ('[[export.targets]]\nkind = "dicom"\nname = "p"\nae_title = "PACS"\n', {},
         "export.targets[0].host", "kind = \"sender\""),
        ('[[export.targets]]\nkind = "orthanc"\nname = "o"\nurl = "ftp://x"\n', {}, "export.targets[0].url", "http"),
        ('[[export.targets]]\nkind = "orthanc"\nname = "o"\nurl = "http://x"\n'
         '[[export.targets]]\nkind = "orthanc"\nname = "o"\nurl = "http://y"\n', {}, "export.targets[1].name",
         "used by another"),
        ('[api]\ntoken = "short"\n', {}, "api.token", "16 characters"),
        ("[storage]\nmin_free_bytes = -1\n", {}, "storage.min_free_bytes", "greater than or equal to 0"),
        ('[storage]\nmin_free_bytes = "1G"\n', {}, "storage.min_free_bytes", "must be a valid integer"),
        ("[storage]\nmin_free_percent = 100\n", {}, "storage.min_free_percent", "less than 100"),
        ("[storage]\nmin_free_percent = -0.5\n", {}, "storage.min_free_percent", "greater than or equal to 0"),
        ("[storage]\nmin_free_percent = nan\n", {}, "storage.min_free_percent", "less than 100, got nan"),
        ("", {"IAN_NODE_STORAGE_MIN_FREE_BYTES": "1.5e9"}, "IAN_NODE_STORAGE_MIN_FREE_BYTES", "integer"),
        ("", {"IAN_NODE_DICOM_PORT": "eleven"}, "IAN_NODE_DICOM_PORT", "integer"),
        ("", {"IAN_NODE_DICOM_PROT": "104"}, "IAN_NODE_DICOM_PROT", "names no configuration key"),
        ("", {"IAN_NODE_EXPORT_TARGETS": "[{kind="}, "IAN_NODE_EXPORT_TARGETS", "TOML"),
    ],
)
def test_invalid_value_raises_config_error_naming_key_and_reason(
    tmp_path: Path, text: str, env: dict[str, str], key: str, reason: str
) -> None:
    error = _error(tmp_path, text, env)
    assert error.key == key
    assert reason in error.reason


def test_unreadable_or_invalid_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", environ={})
    assert "not valid TOML" in _error(tmp_path, "[dicom\n").reason


def test_backoff_doubles_up_to_its_maximum() -> None:
    policy = ExportConfig(backoff_s=2.0, max_backoff_s=10.0)
    assert [policy.backoff(n) for n in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_the_spool_minimum_free_space_is_set_by_file_and_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, "[storage]\nmin_free_bytes = 0\nmin_free_percent = 0\n")
    storage = load_config(path, environ={}).storage
    assert (storage.min_free_bytes, storage.min_free_percent) == (0, 0.0)
    env = {"IAN_NODE_STORAGE_MIN_FREE_BYTES": "500000000", "IAN_NODE_STORAGE_MIN_FREE_PERCENT": "2.5"}
    storage = load_config(path, environ=env).storage
    assert (storage.min_free_bytes, storage.min_free_percent) == (500_000_000, 2.5)


def test_the_example_config_documents_the_spool_minimum_with_its_defaults() -> None:
    example = load_config(Path(__file__).parents[1] / "deploy" / "ian-node.toml", environ={}).storage
    default = StorageConfig()
    assert (example.min_free_bytes, example.min_free_percent) == (default.min_free_bytes, default.min_free_percent)


def test_the_status_page_hides_patient_identity_unless_the_file_or_environment_shows_it(tmp_path: Path) -> None:
    assert load_config(None, environ={}).api.show_patient_identity is False
    path = _write(tmp_path, "[api]\nshow_patient_identity = true\n")
    assert load_config(path, environ={}).api.show_patient_identity is True
    assert load_config(path, environ={"IAN_NODE_API_SHOW_PATIENT_IDENTITY": "false"}).api.show_patient_identity is False
    assert load_config(None, environ={"IAN_NODE_API_SHOW_PATIENT_IDENTITY": "yes"}).api.show_patient_identity is True
    error = _error(tmp_path, '[api]\nshow_patient_identity = "true"\n')
    assert (error.key, error.reason) == ("api.show_patient_identity", "must be a valid boolean, got 'true'")
    assert _error(tmp_path, env={"IAN_NODE_API_SHOW_PATIENT_IDENTITY": "shown"}).key == "IAN_NODE_API_SHOW_PATIENT_IDENTITY"


def test_sections_built_in_code_or_from_the_environment_are_checked_and_stay_frozen() -> None:
    with pytest.raises(ConfigError) as info:
        ExportConfig(targets=(DicomTarget(name="p", ae_title="PACS", host="10.0.0.2"),), backoff_s=0)
    assert (info.value.key, info.value.reason) == ("backoff_s", "must be greater than 0, got 0")
    error = _error(Path(), env={"IAN_NODE_DICOM_ALLOWED_CALLING_AES": "PACS, A-TITLE-OF-SEVENTEEN"})
    assert error.key == "IAN_NODE_DICOM_ALLOWED_CALLING_AES[1].ae_title" and "1 to 16 characters" in error.reason
    policy = ExportConfig(max_attempts=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 4  # type: ignore[misc]
    with pytest.raises(ConfigError, match="max_backoff_s: must be at least backoff_s"):
        dataclasses.replace(policy, max_backoff_s=1.0)
