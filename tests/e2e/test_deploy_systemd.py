"""deploy/systemd: the units pass `systemd-analyze verify`, their command lines parse with
geogate's own CLI once the example env files are substituted, and the stop timeouts leave room
for the processes' own graceful drains."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import GatewaySection
from gateway.cli import SUBCOMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
INSTALLED_GEOGATE = "/opt/geogate/bin/geogate"
SERVICES = {"geogate-replica@.service": "replica", "geogate-gateway.service": "gateway",
            "geogate-sync.service": "sync", "geogate-dns.service": "dns"}
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
             "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "SystemCallArchitectures": "native"}
# The replica's --drain-timeout-s default and the gateway's drain_timeout_ms default.
REPLICA_DRAIN_S = 30
GATEWAY_DRAIN_S = GatewaySection().drain_timeout_ms / 1000


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string((UNITS / name).read_text())
    return parser


def _env_file(name: str) -> dict[str, str]:
    env = {}
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, f"unsupported time span {value!r}"
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


def test_units_pass_systemd_analyze_verify(tmp_path):
    """systemd's own parser: unknown keys, bad values and missing executables are reported."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (Debian package systemd) is needed to check the units"
    real_geogate = str(Path(sys.executable).parent / "geogate")
    assert Path(real_geogate).exists()
    names = []
    for unit in [*SERVICES, "geogate.target"]:
        text = (UNITS / unit).read_text().replace(INSTALLED_GEOGATE, real_geogate)
        instance = unit.replace("@.", "@1.")
        (tmp_path / unit).write_text(text)
        if instance != unit:
            (tmp_path / instance).symlink_to(tmp_path / unit)
        names.append(str(tmp_path / instance))
    done = subprocess.run([analyze, "verify", "--man=no", *names], capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if str(tmp_path) in line]
    assert done.returncode == 0 and not problems, "\n".join(problems) or done.stderr

    # The check is real: a misspelt key is reported.
    (tmp_path / "bad.service").write_text("[Service]\nExecStart=/bin/true\nRestartt=always\n")
    done = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "bad.service")],
                          capture_output=True, text=True, timeout=60)
    assert "Restartt" in done.stdout + done.stderr


@pytest.mark.parametrize("unit,subcommand", SERVICES.items())
def test_exec_start_parses_with_the_real_cli(unit, subcommand):
    service = _unit(unit)["Service"]
    env = _env_file("geogate.env.example")
    if unit.startswith("geogate-replica@"):
        env |= _env_file("replica.env.example")
    exec_start = service["ExecStart"]
    words = shlex.split(exec_start)
    assert words[0] == INSTALLED_GEOGATE and words[1] == subcommand in SUBCOMMANDS

    def expand(word: str) -> str:
        return re.sub(r"\$\{([A-Z0-9_]+)\}", lambda m: env[m.group(1)], word)

    argv = [expand(w) for w in words[1:]]
    try:
        build_parser(argv).parse_args(argv)
    except SystemExit:
        pytest.fail(f"{unit}: `geogate {' '.join(argv)}` is rejected by geogate's CLI parser")


@pytest.mark.parametrize("unit", SERVICES)
def test_restart_stop_and_hardening(unit):
    unit_file = _unit(unit)
    service = unit_file["Service"]
    assert service["Type"] == "exec"
    assert service["User"] == "geogate" and service["Group"] == "geogate"
    assert service["Restart"] in ("on-failure", "always")
    assert service["KillSignal"] == "SIGTERM"
    stop_s = _seconds(service["TimeoutStopSec"])
    if unit.startswith("geogate-replica@"):
        assert stop_s > REPLICA_DRAIN_S and f"--drain-timeout-s {REPLICA_DRAIN_S}" in service["ExecStart"]
    if unit == "geogate-gateway.service":
        assert stop_s > GATEWAY_DRAIN_S
    for key, value in HARDENING.items():
        assert service.get(key) == value, f"{unit}: {key}"
    # No capability at all, except the DNS responder's port-53 bind.
    expected_caps = "CAP_NET_BIND_SERVICE" if unit == "geogate-dns.service" else ""
    assert service["CapabilityBoundingSet"] == expected_caps
    assert service["AmbientCapabilities"] == expected_caps
    assert "geogate.target" in unit_file["Install"]["WantedBy"]
    assert unit_file["Unit"]["PartOf"] == "geogate.target"


def test_sync_is_the_only_writer_of_the_repository():
    assert _unit("geogate-sync.service")["Service"]["ReadWritePaths"] == "/var/lib/geogate"
    for unit in ("geogate-replica@.service", "geogate-gateway.service", "geogate-dns.service"):
        assert "ReadWritePaths" not in _unit(unit)["Service"], unit
