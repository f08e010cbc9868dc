"""The deployment files, checked as far as a machine without Docker allows.

- deploy/ian-node.toml loads with the node's own config loader, alone and with the compose file's
  environment overrides;
- deploy/docker-compose.yml parses (PyYAML), its build contexts, Dockerfiles and mounted files exist,
  and its ports, host names and AE titles agree with the toml and orthanc/orthanc.json;
- deploy/Dockerfile: its stages, COPY sources, exposed ports, health check and command agree with the
  rest; deploy/ian-node.service passes `systemd-analyze verify`;
- orthanc/orthanc.json is accepted by Debian's real Orthanc, which loads our plugin from it;
- orthanc/plugin.py imports only the standard library and `orthanc`.
"""

from __future__ import annotations

import ast
import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from ian_node.config import NodeConfig, OrthancTarget, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TOML = DEPLOY / "ian-node.toml"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
SERVICE = DEPLOY / "ian-node.service"
ORTHANC_JSON = ROOT / "orthanc" / "orthanc.json"
PLUGIN = ROOT / "orthanc" / "plugin.py"
SECRETS = {"ORTHANC_ADMIN_PASSWORD": "admin-secret", "ORTHANC_NODE_PASSWORD": "node-secret",
           "IAN_NODE_API_TOKEN": "token-0123456789abcdef"}

_COMPOSE_VAR = re.compile(r"\$\{(\w+)(?::?[?-][^}]*)?\}")


def orthanc_json() -> dict[str, Any]:
    return json.loads(ORTHANC_JSON.read_text())


def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (the test extra installs it: pip install -e .[test])")
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?message} and ${VAR:-default} with the given variables."""
    return _COMPOSE_VAR.sub(lambda m: env[m.group(1)], value)


def container_ports(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> the host binding string, from compose's short port syntax."""
    ports = {}
    for entry in service["ports"]:
        *host, container = str(entry).split(":")
        ports[int(container)] = ":".join(host)
    return ports


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        pending += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
            pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


@pytest.fixture(scope="module")
def node_config() -> NodeConfig:
    return load_config(TOML, environ={})


def test_example_toml_is_a_valid_node_config_with_state_under_var_lib(node_config: NodeConfig) -> None:
    assert node_config.dicom.port == 11112 and node_config.api.port == 8765
    assert node_config.storage.spool_dir.is_relative_to("/var/lib/ian-node")
    assert node_config.storage.state_path.is_relative_to("/var/lib/ian-node")
    assert [t.kind for t in node_config.export.targets] == ["orthanc"]


def test_compose_environment_overrides_load_into_a_valid_config_pointing_at_the_orthanc_service() -> None:
    services = compose()["services"]
    env = {k: interpolate(str(v), SECRETS) for k, v in services["ian-node"]["environment"].items()}
    config = load_config(TOML, environ=env)
    assert config.dicom.bind == "0.0.0.0" and config.api.bind == "0.0.0.0"
    assert config.api.token == SECRETS["IAN_NODE_API_TOKEN"]
    assert [a.ae_title for a in config.dicom.allowed_calling_aes][0] == orthanc_json()["DicomAet"]
    (target,) = config.export.targets
    assert isinstance(target, OrthancTarget) and target.password == SECRETS["ORTHANC_NODE_PASSWORD"]
    url = urlsplit(target.url)
    assert url.hostname == "orthanc" and "orthanc" in services
    assert url.port == orthanc_json()["HttpPort"] and target.username in orthanc_json()["RegisteredUsers"]


def test_compose_ports_agree_with_the_toml_and_orthanc_json(node_config: NodeConfig) -> None:
    services = compose()["services"]
    node_ports = container_ports(services["ian-node"])
    assert set(node_ports) == {node_config.dicom.port, node_config.api.port}
    assert node_ports[node_config.api.port].startswith("127.0.0.1")  # the API is not published beyond the host
    config = orthanc_json()
    orthanc_ports = container_ports(services["orthanc"])
    assert set(orthanc_ports) == {config["DicomPort"], config["HttpPort"]}
    assert orthanc_ports[config["HttpPort"]].startswith("127.0.0.1")
    assert f":{node_config.api.port}/health" in " ".join(services["ian-node"]["healthcheck"]["test"])
    assert f":{config['HttpPort']}/" in " ".join(services["orthanc"]["healthcheck"]["test"])


def test_orthanc_json_names_the_node_as_compose_and_the_toml_do(node_config: NodeConfig) -> None:
    config = orthanc_json()
    section = config["IanNode"]
    ae_title, host, port = config["DicomModalities"][section["Modality"]]
    assert (ae_title, port) == (node_config.dicom.ae_title, node_config.dicom.port)
    node_url = urlsplit(section["NodeUrl"])
    assert host == node_url.hostname == "ian-node" and "ian-node" in compose()["services"]
    assert node_url.port == node_config.api.port


def test_compose_mounts_and_builds_files_that_exist_where_orthanc_json_expects_them() -> None:
    services = compose()["services"]
    config = orthanc_json()
    mounts = {}
    for entry in services["orthanc"]["volumes"]:
        source, target, *_ = entry.split(":")
        if source.startswith("."):
            assert (DEPLOY / source).resolve().is_file(), source
            mounts[target] = (DEPLOY / source).resolve()
    assert mounts[config["PythonScript"]] == PLUGIN
    (config_path,) = services["orthanc"]["command"]
    assert mounts[config_path] == ORTHANC_JSON
    node_build = services["ian-node"]["build"]
    assert (DEPLOY / node_build["context"] / node_build["dockerfile"]).resolve() == DOCKERFILE
    inline = services["orthanc"]["build"]["dockerfile_inline"]
    for package in ("orthanc", "orthanc-python", "orthanc-dicomweb", "curl"):
        assert re.search(rf"\s{re.escape(package)}(\s|$)", inline), package
    # The plugin paths are where Debian's packages put them (the same Orthanc the tests run).
    from tests.integration.orthanc_server import DICOMWEB_PLUGIN, PYTHON_PLUGIN

    assert config["Plugins"] == [str(PYTHON_PLUGIN), str(DICOMWEB_PLUGIN)]


def test_compose_reserves_the_gpu_for_the_node_and_keeps_data_in_named_volumes(node_config: NodeConfig) -> None:
    document = compose()
    node = document["services"]["ian-node"]
    (device,) = node["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in document["services"]["orthanc"]
    named = {}
    for entry in node["volumes"]:
        source, target = entry.split(":")[:2]
        assert source in document["volumes"], f"{source} is not a named volume"
        named[Path(target)] = source
    assert node_config.storage.spool_dir in named
    assert node_config.storage.state_path.parent in named
    assert all(s["healthcheck"]["test"][0] == "CMD" for s in document["services"].values())


def test_secrets_orthanc_json_reads_from_its_environment_are_required_by_compose() -> None:
    needed = set(re.findall(r"\$\{(\w+)\}", ORTHANC_JSON.read_text()))
    assert needed == set(SECRETS)
    environment = compose()["services"]["orthanc"]["environment"]
    for name in needed:
        assert re.fullmatch(rf"\$\{{{name}:\?.+\}}", environment[name]), f"{name} must be required (:?)"


def test_dockerfile_stages_copies_ports_and_command_agree_with_the_repository(node_config: NodeConfig) -> None:
    instructions = dockerfile_instructions()
    args_before_from = {a.split("=")[0] for w, a in instructions[: [w for w, _ in instructions].index("FROM")]
                        if w == "ARG"}
    stages = {}
    for word, rest in instructions:
        if word == "FROM":
            image, _, name = rest.partition(" AS ")
            stages[name.strip()] = image.strip()
    assert stages["base-cpu"] == "${CPU_BASE}" and stages["base-cuda"] == "${CUDA_BASE}"
    assert stages["node"] == "base-${VARIANT}" and {"VARIANT", "CPU_BASE", "CUDA_BASE"} <= args_before_from
    for word, rest in instructions:
        if word == "COPY":
            *sources, _dest = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY source {source} is missing"
    exposed = {int(p) for w, r in instructions if w == "EXPOSE" for p in r.split()}
    assert exposed == {node_config.dicom.port, node_config.api.port}
    health = next(r for w, r in instructions if w == "HEALTHCHECK")
    assert f"127.0.0.1:{node_config.api.port}/health" in health
    user = next(r for w, r in instructions if w == "USER")
    assert user not in ("root", "0")
    command = json.loads(next(r for w, r in instructions if w == "CMD"))
    assert json.loads(next(r for w, r in instructions if w == "ENTRYPOINT")) == ["ian-node"]
    assert command[-3:-1] == ["serve", "--config"]
    assert any(w == "COPY" and r.split() == ["deploy/ian-node.toml", command[-1]] for w, r in instructions)
    pin = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert f"ARG TORCH_VERSION={pin}" in [f"{w} {r}" for w, r in instructions]


def test_systemd_unit_is_sandboxed_and_can_write_only_its_state(node_config: NodeConfig) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(SERVICE.read_text())
    service = parser["Service"]
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert service.get("User") or service.get("DynamicUser") == "yes"
    writable = [Path(p) for p in service["ReadWritePaths"].split()]
    for path in (node_config.storage.spool_dir, node_config.storage.state_path.parent):
        assert any(path.is_relative_to(w) for w in writable), f"{path} is not writable for the service"
    executable, *args = shlex.split(service["ExecStart"])
    assert Path(executable).name == "ian-node" and args[-3:] == ["serve", "--config", "/etc/ian-node/ian-node.toml"]


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify also checks that ExecStart's program exists: stand /bin/true in for the installed node.
    unit = tmp_path / "ian-node.service"
    unit.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", SERVICE.read_text(), flags=re.MULTILINE))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


def test_plugin_imports_only_the_standard_library_and_orthanc() -> None:
    tree = ast.parse(PLUGIN.read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert modules - set(sys.stdlib_module_names) == {"orthanc"}


def test_orthanc_json_ian_node_keys_are_the_ones_the_plugin_reads() -> None:
    read = set(re.findall(r'section\.get\("(\w+)"', PLUGIN.read_text()))
    assert set(orthanc_json()["IanNode"]) <= read
    assert re.search(r'METADATA = "(\w+)"', PLUGIN.read_text()).group(1) in orthanc_json()["UserMetadata"]


@pytest.mark.integration
def test_debian_orthanc_accepts_orthanc_json_and_loads_the_plugin_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example as it is, except what must differ here: ports, storage, the plugin's path on disk."""
    from tests.integration.orthanc_server import orthanc_server

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    config = orthanc_json()
    local = {"Name", "StorageDirectory", "IndexDirectory", "DicomPort", "HttpPort", "RemoteAccessAllowed",
             "AuthenticationEnabled", "RegisteredUsers", "Plugins"}
    extra = {k: v for k, v in config.items() if k not in local} | {"PythonScript": str(PLUGIN)}
    plugins = [Path(p) for p in config["Plugins"]]
    with orthanc_server(tmp_path, plugins, extra, aet=config["DicomAet"]) as orthanc:
        assert "ian-node" in orthanc.get("/modalities").json()
        # The plugin's route answers: it loaded, read its settings and registered its REST callback.
        missing = orthanc.post("/ian-node/series/00000000-00000000-00000000-00000000-00000000/segment")
        assert missing.status_code == 404 and "no series" in missing.text
        log = orthanc.log_text()
    assert "does not declare" not in log
    assert "Traceback" not in log
