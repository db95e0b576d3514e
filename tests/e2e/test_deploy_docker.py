"""deploy/docker: no Docker engine runs here, so the images are not built. What can be checked
offline: every file the Dockerfiles copy exists and passes their .dockerignore allow-list, the
extras they install exist in pyproject.toml (CPU and GPU never together), and the copied files
alone build the geogate wheel with everything the console script needs."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = {"Dockerfile": "cpu", "Dockerfile.gpu": "gpu"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _copies(dockerfile: str) -> list[str]:
    """Sources of COPY instructions that read the build context (not --from=stage)."""
    sources = []
    for line in (DOCKER / dockerfile).read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics, enough for an allow-list: last matching rule wins."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") or (
                pat.startswith("**/") and fnmatch.fnmatch(Path(path).name, pat[3:])):
            ignored = not negate
    return ignored


def _ignore_patterns(dockerfile: str) -> list[str]:
    text = (DOCKER / f"{dockerfile}.dockerignore").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copied_files_exist_and_are_in_the_build_context(dockerfile):
    sources = _copies(dockerfile)
    assert "pyproject.toml" in sources
    patterns = _ignore_patterns(dockerfile)
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"{dockerfile}: COPY {src}: no such file in the repository"
        assert not _ignored(src.rstrip("/"), patterns), f"{dockerfile}: COPY {src} is excluded by its .dockerignore"
    # Every Python package of the distribution is copied.
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    copied_dirs = {s.rstrip("/") for s in sources}
    for pattern in packages:
        assert pattern.rstrip("*") in copied_dirs, f"{dockerfile} does not copy package {pattern}"
    # The readme the build metadata names is copied too.
    assert PYPROJECT["project"]["readme"] in sources
    # The ignore file really filters: tests and virtualenvs stay out of the context.
    assert _ignored("tests/unit/core/test_config.py", patterns) and _ignored(".venv/bin/python", patterns)


@pytest.mark.parametrize("dockerfile,extra", DOCKERFILES.items())
def test_installs_exactly_one_onnxruntime_extra(dockerfile, extra):
    text = (DOCKER / dockerfile).read_text()
    installs = re.findall(r'install "\.\[([a-z,]+)\]"', text)
    assert installs == [extra], f"{dockerfile} installs extras {installs}"
    deps = PYPROJECT["project"]["optional-dependencies"][extra]
    wanted = "onnxruntime-gpu" if extra == "gpu" else "onnxruntime=="
    assert any(d.startswith(wanted) for d in deps), deps
    assert not any(d.startswith("onnxruntime") for d in PYPROJECT["project"]["dependencies"])
    assert "USER 10001:10001" in text and 'ENTRYPOINT ["geogate"]' in text
    if extra == "gpu":
        assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:12\.", text, re.M), "GPU image on a CUDA 12 base"


def test_copied_files_alone_build_the_wheel(tmp_path):
    """Stage exactly what the Dockerfile copies, build a wheel from it (no network: the
    project's build backend is already installed), and check the wheel's contents."""
    context = tmp_path / "context"
    for src in _copies("Dockerfile"):
        if src.startswith("deploy/"):
            continue  # copied into the final image, not part of the build
        s, d = ROOT / src, context / src
        if s.is_dir():
            shutil.copytree(s, d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, d)
    out = tmp_path / "wheel"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(context)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = out.glob("geogate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("gateway/cli.py", "gateway/server/main.py", "replicas/server/main.py", "replicas/sync/agent.py",
                   "geo/dns_server.py"):
        assert needed in names, f"{needed} missing from the wheel built from the Docker context"
    # Non-Python files the program serves (status page assets) travel in the wheel too.
    ui_files = {str(p.relative_to(ROOT)) for p in (ROOT / "gateway" / "ui").rglob("*")
                if p.is_file() and p.suffix in (".html", ".js", ".css", ".json")}
    assert ui_files <= names, sorted(ui_files - names)
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
    assert entry_points and "geogate = gateway.cli:main" in zipfile.ZipFile(wheel).read(entry_points[0]).decode()
