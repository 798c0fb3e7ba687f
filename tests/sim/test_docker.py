"""Static checks of docker/ against the installed Flower and fedleak (no Docker engine needed).

The image and compose files cannot be run where they were written, so this checks what can go
stale: the pinned flwr version, the programs and flags the containers start, the node configs,
the flwr connection config, the run-directory mount, and the app's components.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.metadata
import inspect
import json
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
COMPOSE_FILES = ["compose.yml", "compose.tls.yml"]
FLOWER_PROGRAMS = ("flower-superlink", "flower-supernode")
TLS_FLAGS = {
    "flower-superlink": {
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
    },
    "flower-supernode": {"--root-certificates", "--auth-supernode-private-key"},
}


# --- parsing ---------------------------------------------------------------------------------


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [
        ln
        for ln in (DOCKER / "Dockerfile").read_text().splitlines()
        if not ln.lstrip().startswith("#")
    ]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (m.group(1).upper(), m.group(2).strip())
        for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)
    ]


def instructions(name: str) -> list[str]:
    return [args for instr, args in dockerfile() if instr == name]


def build_args() -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in instructions("ARG") if "=" in arg)


def env() -> dict[str, str]:
    pairs = re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", " ".join(instructions("ENV")))
    return {k: v.strip('"') for k, v in pairs}


@cache
def compose(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def services(name: str) -> dict[str, dict]:
    """The services of a compose file; an override is merged onto compose.yml (command replaces,
    volumes merge by target), as Docker Compose does."""
    merged = {k: dict(v) for k, v in compose("compose.yml")["services"].items()}
    if name == "compose.yml":
        return merged
    for svc, spec in compose(name)["services"].items():
        base = merged.setdefault(svc, {})
        if "command" in spec:
            base["command"] = spec["command"]
        if "volumes" in spec:
            by_target = {volume(v)[1]: v for v in base.get("volumes", [])}
            by_target.update({volume(v)[1]: v for v in spec["volumes"]})
            base["volumes"] = list(by_target.values())
    return merged


def volume(spec: str) -> tuple[str, str]:
    """(source, target) of a short-syntax volume."""
    parts = spec.split(":")
    return parts[0], parts[1]


def commands(name: str) -> list[tuple[str, list[str]]]:
    return [
        (svc, [str(x) for x in spec["command"]])
        for svc, spec in services(name).items()
        if "command" in spec
    ]


def flags(cmd: list[str]) -> dict[str, str | None]:
    """``--flag`` -> the value after it (None for a switch)."""
    out: dict[str, str | None] = {}
    for i, token in enumerate(cmd):
        if token.startswith("--"):
            key, _, value = token.partition("=")
            nxt = cmd[i + 1] if i + 1 < len(cmd) else None
            out[key] = value or (nxt if nxt is not None and not nxt.startswith("--") else None)
    return out


def flwr_config(name: str) -> dict:
    """The $FLWR_HOME/config.toml handed to the `fedleak` service (the override's if it has one)."""
    for file in (name, "compose.yml"):
        content = compose(file).get("configs", {}).get("flwr-config", {}).get("content")
        if content:
            return tomllib.loads(content)
    raise AssertionError("no configs.flwr-config.content in compose.yml")


@cache
def help_texts() -> dict[str, str]:
    """``<program> --help`` of both Flower programs, run side by side (each imports flwr: ~3 s)."""
    procs = {
        p: subprocess.Popen(
            [str(BIN / p), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for p in FLOWER_PROGRAMS
    }
    texts = {}
    for program, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 0, err
        texts[program] = out
    return texts


def help_text(program: str) -> str:
    return help_texts()[program]


def option_help(program: str, flag: str) -> str:
    """The help paragraph of one option (empty if the option does not exist)."""
    m = re.search(
        rf"^  (?:-\w+, )?{re.escape(flag)}(?=[\s=,]).*?(?=^  -|\Z)", help_text(program), re.M | re.S
    )
    return m.group(0) if m else ""


# --- the image -------------------------------------------------------------------------------


def test_dockerfile_pins_the_installed_flwr_within_setup_cfg():
    pinned = build_args()["FLWR_VERSION"]
    assert pinned == importlib.metadata.version("flwr")
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = [Requirement(r) for r in cfg["options"]["install_requires"].split("\n") if r.strip()]
    (flwr,) = [r for r in reqs if r.name == "flwr"]
    assert "simulation" in flwr.extras
    assert flwr.specifier.contains(pinned), (pinned, str(flwr.specifier))
    assert any('"flwr[simulation]==${FLWR_VERSION}"' in run for run in instructions("RUN"))


def test_dockerfile_base_torch_env_and_sources():
    assert instructions("FROM") == ["python:3.11-slim"]
    torch = Requirement(build_args()["TORCH_SPEC"])
    assert torch.name == "torch"
    assert torch.specifier.contains(Version(importlib.metadata.version("torch")).base_version)
    assert build_args()["TORCH_INDEX"].endswith("/whl/cpu")
    assert any('"${TORCH_SPEC}"' in run and "--index-url" in run for run in instructions("RUN"))
    assert any('"/src[dp]"' in run for run in instructions("RUN"))
    assert {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_HOME": "/flwr",
    }.items() <= env().items()
    assert not instructions("ENTRYPOINT")
    for copy in instructions("COPY"):
        *sources, _dest = copy.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"


# --- programs and flags ----------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_programs_are_installed_console_scripts(name):
    programs = {cmd[0] for _, cmd in commands(name)}
    programs.add(json.loads(instructions("CMD")[0])[0])
    assert programs <= {*FLOWER_PROGRAMS, "fedleak", "flwr"}, programs
    for program in programs | {"flwr", "flower-superexec"}:  # flwr: README; superexec: --isolation
        assert (BIN / program).is_file(), f"{program} is not a console script in {BIN}"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_flower_flags_exist_and_are_not_deprecated(name):
    for svc, cmd in commands(name):
        if cmd[0] not in FLOWER_PROGRAMS:
            continue
        for flag in flags(cmd):
            paragraph = option_help(cmd[0], flag)
            assert paragraph, f"{name}: {svc}: {cmd[0]} has no {flag} (see {cmd[0]} --help)"
            assert "deprecated" not in paragraph.lower(), f"{name}: {svc}: {flag} is deprecated"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_superlink_address_port_and_transport(name):
    svcs = services(name)
    link = flags(svcs["superlink"]["command"])
    default_port = re.search(r"set\s+to\s+(\d+)", option_help("flower-superlink", "--port")).group(
        1
    )
    port = link.get("--port", default_port)
    assert port == default_port == "8000"  # Flower 1.41: one HTTP port for Fleet + Control APIs
    assert link["--host"] == "0.0.0.0", "the default 127.0.0.1 is unreachable from other containers"
    assert any(str(p).endswith(f":{port}") for p in svcs["superlink"]["ports"])
    nodes = [s for s, spec in svcs.items() if spec.get("command", [""])[0] == "flower-supernode"]
    assert len(nodes) == 2
    for svc in nodes:
        assert flags(svcs[svc]["command"])["--superlink"] == f"superlink:{port}"
    tls = name != "compose.yml"
    for svc, cmd in commands(name):
        if cmd[0] in FLOWER_PROGRAMS:
            assert ("--insecure" in cmd) is not tls, f"{name}: {svc}"
            if tls:
                assert TLS_FLAGS[cmd[0]] <= set(flags(cmd)), f"{name}: {svc}"
                for flag in TLS_FLAGS[cmd[0]]:  # every certificate/key path is mounted
                    if path := flags(cmd)[flag]:
                        targets = {volume(v)[1] for v in svcs[svc]["volumes"]}
                        assert path in targets, f"{name}: {svc}: {path} is not mounted"


def test_tls_files_come_from_generate_sh():
    script = (DOCKER / "certs" / "generate.sh").read_text()
    for svc in services("compose.tls.yml").values():
        for source, _ in map(volume, svc.get("volumes", [])):
            if source.startswith("./certs/"):
                file = PurePosixPath(source).name
                pattern = re.sub(r"\d+", "$i", file)  # supernode-0 -> supernode-$i
                assert file in script or pattern in script, f"generate.sh does not write {file}"


# --- node configs, run directory, flwr connection, app ---------------------------------------


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_node_configs_parse_and_use_the_keys_the_client_reads(name):
    from flwr.common.config import parse_config_args

    from fedleak.sim import client

    source = inspect.getsource(client)
    svcs = services(name)
    configs = {}
    for svc, cmd in commands(name):
        if cmd[0] == "flower-supernode":
            configs[svc] = parse_config_args([flags(cmd)["--node-config"]])  # Flower's own parser
    for svc, cfg in configs.items():
        assert set(cfg) == {"partition-id", "num-partitions", "data-root"}, cfg
        for key in cfg:
            assert f'"{key}"' in source, f"fedleak.sim.client does not read {key!r}"
        assert isinstance(cfg["data-root"], str)
        assert cfg["data-root"] in {volume(v)[1] for v in svcs[svc]["volumes"]}
    assert sorted(c["partition-id"] for c in configs.values()) == list(range(2))
    assert {c["num-partitions"] for c in configs.values()} == {2}


def test_run_directory_is_shared_with_the_superlink():
    from fedleak import pipeline

    svcs = services("compose.yml")
    runs = {volume(v) for v in svcs["superlink"]["volumes"]} & {
        volume(v) for v in svcs["fedleak"]["volumes"]
    }
    targets = {target for _, target in runs}
    base = inspect.signature(pipeline.default_dir).parameters["base"].default
    workdir = instructions("WORKDIR")[-1]
    assert str(PurePosixPath(workdir) / base) in targets, (workdir, base, runs)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_flwr_connection_config(name):
    from flwr.cli.flower_config import parse_superlink_connection

    cfg = flwr_config(name)["superlink"]
    conn = parse_superlink_connection(cfg[cfg["default"]], cfg["default"])  # Flower validates
    link = flags(services(name)["superlink"]["command"])
    assert conn.address == f"superlink:{link['--port']}"
    assert conn.insecure is ("--insecure" in link)
    if not conn.insecure:
        fedleak = services(name)["fedleak"]
        assert conn.root_certificates in {volume(v)[1] for v in fedleak["volumes"]}
    assert {volume(v)[1] for v in services(name)["fedleak"]["volumes"]} >= {"/runs", "/data"}
    target = compose("compose.yml")["services"]["fedleak"]["configs"][0]["target"]
    assert target == f"{env()['FLWR_HOME']}/config.toml"


def test_app_components_exist():
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    app = tomllib.loads((ROOT / "fedleak" / "sim" / "app" / "pyproject.toml").read_text())
    components = app["tool"]["flwr"]["app"]["components"]
    for key, cls in (("serverapp", ServerApp), ("clientapp", ClientApp)):
        module, attr = components[key].split(":")
        assert module in {"fedleak.sim.server", "fedleak.sim.client"}
        assert isinstance(getattr(importlib.import_module(module), attr), cls)
