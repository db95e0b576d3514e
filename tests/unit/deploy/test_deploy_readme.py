"""deploy/README.md: every `geogate ...` command in its shell blocks parses with geogate's CLI,
and every file it names under deploy/ exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from gateway.cli import build_parser

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "deploy" / "README.md"


def _shell_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    lines = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("geogate ")]


def test_readme_geogate_commands_parse():
    commands = _shell_commands()
    assert len(commands) >= 5, commands
    for command in commands:
        argv = shlex.split(command)[1:]
        try:
            build_parser(argv).parse_args(argv)
        except SystemExit:
            pytest.fail(f"deploy/README.md: `{command}` is rejected by geogate's CLI parser")


def test_readme_paths_exist():
    text = README.read_text()
    paths = set(re.findall(r"`((?:k8s|docker|systemd|route53|cloudflare|anycast|prometheus|grafana|examples)/[^`\s]*)`",
                           text))
    paths |= set(re.findall(r"(?<![\w/])deploy/([\w./@-]+[\w@-])", text))
    assert len(paths) >= 10, paths
    for rel in paths:
        rel = rel.replace("*.service", "").rstrip("/")
        if "*" in rel:
            continue
        assert (ROOT / "deploy" / rel).exists(), f"deploy/README.md names deploy/{rel}, which does not exist"
