"""Render geogate's Kubernetes overlays with kustomize, offline.

    python deploy/k8s/render.py                 # every overlay, as YAML on stdout
    python deploy/k8s/render.py --out DIR       # DIR/<overlay>.yaml per overlay
    python deploy/k8s/render.py eu-west         # one overlay

Uses a standalone `kustomize` (v5) when one is on PATH, else `kubectl kustomize` (kubectl
bundles kustomize; v1.27+ bundles kustomize v5). Nothing here talks to a cluster. The tests
(tests/e2e/test_deploy_manifests.py) render through this module and validate every document
against the Kubernetes JSON schemas.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

K8S_DIR = Path(__file__).resolve().parent
OVERLAYS_DIR = K8S_DIR / "overlays"
COMPONENTS_DIR = K8S_DIR / "components"
RENDER_TIMEOUT_S = 60


class RenderError(RuntimeError):
    """kustomize is missing or refused an overlay; the message says which and why."""


def kustomize_command() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    raise RenderError("neither `kustomize` nor `kubectl` is on PATH: install one of them "
                      "(kubectl bundles kustomize) to render deploy/k8s")


def overlay_names() -> list[str]:
    return sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())


def render_text(overlay: str) -> str:
    path = OVERLAYS_DIR / overlay
    if not (path / "kustomization.yaml").is_file():
        raise RenderError(f"no overlay {overlay!r} (known: {', '.join(overlay_names())})")
    cmd = [*kustomize_command(), str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RENDER_TIMEOUT_S)
    if done.returncode != 0:
        raise RenderError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def render(overlay: str) -> list[dict]:
    """The overlay's documents, parsed."""
    return [d for d in yaml.safe_load_all(render_text(overlay)) if d]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="render geogate's kustomize overlays")
    parser.add_argument("overlays", nargs="*", help="overlay names (default: all)")
    parser.add_argument("--out", help="write <overlay>.yaml files into this directory")
    args = parser.parse_args(argv)
    try:
        for name in args.overlays or overlay_names():
            text = render_text(name)
            if args.out:
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{name}.yaml").write_text(text)
            else:
                sys.stdout.write(f"# ---- overlay {name}\n{text}")
    except RenderError as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
