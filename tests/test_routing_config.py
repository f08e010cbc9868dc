"""The routing and stated-size keys: from TOML, from IAN_NODE_* variables, and the errors naming them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ian_node.config import ConfigError, DicomTarget, SenderTarget, load_config
from ian_node.export.routing import Route
from ian_node.jobs.completion import SizeRules

TOML = """
[series]
settle_on_stated_size = true
stated_size_min_slices = 20
expected_counts = [{ series_description = "^MRN 3D", count = 120 }]

[[export.targets]]
name = "pacs"
kind = "dicom"
ae_title = "PACS"
host = "10.0.0.2"
match_calling_ae = ["MODALITY1"]
match_modality = ["MR"]
match_series_description = "nerve|MRN"

[[export.targets]]
name = "back"
kind = "sender"
senders = [{ ae_title = "MODALITY1", host = "10.0.0.7", port = 11112 }]
"""


def test_rules_and_senders_are_read_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(TOML)
    config = load_config(path, environ={})
    pacs, back = config.export.targets
    assert isinstance(pacs, DicomTarget) and isinstance(back, SenderTarget)
    assert Route.from_target(pacs) == Route(calling_aes=("MODALITY1",), modalities=("MR",),
                                            series_description="nerve|MRN")
    assert Route.from_target(back) == Route(needs_sender=True)
    assert [(s.ae_title, s.host, s.port) for s in back.senders] == [("MODALITY1", "10.0.0.7", 11112)]
    assert SizeRules.from_config(config.series) == SizeRules(enabled=True, min_slices=20,
                                                             expected_counts=(("^MRN 3D", 120),))


def test_defaults_route_everything_and_conclude_on_a_stated_size_of_at_least_10_slices() -> None:
    config = load_config(None, environ={})
    assert SizeRules.from_config(config.series) == SizeRules(enabled=True, min_slices=10)
    assert Route.from_target(DicomTarget(name="p", ae_title="P", host="127.0.0.1")) == Route()


def test_environment_overrides_follow_the_section_key_naming() -> None:
    config = load_config(None, environ={
        "IAN_NODE_SERIES_SETTLE_ON_STATED_SIZE": "false",
        "IAN_NODE_SERIES_STATED_SIZE_MIN_SLICES": "30",
        "IAN_NODE_SERIES_EXPECTED_COUNTS": '[{series_description = "MRN", count = 64}]',
        "IAN_NODE_EXPORT_TARGETS": '[{name = "back", kind = "sender", match_modality = ["MR"],'
                                   ' senders = [{ae_title = "MOD1", host = "127.0.0.1", port = 104}]}]',
    })
    assert SizeRules.from_config(config.series) == SizeRules(enabled=False, min_slices=30,
                                                             expected_counts=(("MRN", 64),))
    (back,) = config.export.targets
    assert isinstance(back, SenderTarget) and back.match_modality == ("MR",)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[[export.targets]]\nname = "p"\nkind = "dicom"\nae_title = "P"\nhost = "1.2.3.4"\n'
         'match_series_description = "(MRN"\n', "export.targets[0].match_series_description"),
        ('[[export.targets]]\nname = "p"\nkind = "dicom"\nae_title = "P"\nhost = "1.2.3.4"\n'
         'match_calling_ae = ["A_TITLE_LONGER_THAN_16"]\n', "export.targets[0].match_calling_ae"),
        ('[[export.targets]]\nname = "b"\nkind = "sender"\nsenders = []\n', "export.targets[0].senders"),
        ('[[export.targets]]\nname = "b"\nkind = "sender"\nsenders = [{ ae_title = "M", host = "m.example" }]\n',
         "export.targets[0].senders"),
        ('[[export.targets]]\nname = "b"\nkind = "sender"\nsenders = [{ ae_title = "M", host = "1.2.3.4" },'
         ' { ae_title = "M", host = "1.2.3.5" }]\n', "export.targets[0].senders[1].ae_title"),
        ("[series]\nstated_size_min_slices = 1\n", "series.stated_size_min_slices"),
        ('[series]\nexpected_counts = [{ series_description = "MRN", count = 0 }]\n', "series.expected_counts"),
    ],
)
def test_a_bad_routing_or_size_value_names_its_key(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.key.startswith(key), caught.value
