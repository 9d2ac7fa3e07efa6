"""The repository's k8s/ as the tests read it: scripts/render_k8s.py loaded as a module, and the rendered
manifests (k8s/rendered/**) per overlay."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("render_k8s", ROOT / "scripts" / "render_k8s.py")
render_k8s = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_k8s)
RENDERED = ROOT / "k8s" / "rendered"


def load_rendered() -> dict[str, list[dict]]:
    """The documents of k8s/rendered/<overlay>/*.yaml, per overlay (none before the first render)."""
    out = {}
    for d in sorted(p for p in RENDERED.iterdir() if p.is_dir()) if RENDERED.is_dir() else []:
        out[d.name] = [doc for f in sorted(d.glob("*.yaml")) for doc in yaml.safe_load_all(f.read_text()) if doc]
    return out


OVERLAY_DOCS = load_rendered()
ALL_DOCS = [(o, d) for o, docs in OVERLAY_DOCS.items() for d in docs]


def rayservices() -> list[tuple[str, dict]]:
    """Every rendered RayService, as (overlay, document)."""
    return [(o, d) for o, d in ALL_DOCS if d["kind"] == "RayService"]


def pod_specs(rs: dict) -> list[tuple[str, dict]]:
    """A RayService's pod specs, as (group name, spec): the head's ("head") and each worker group's."""
    rc = rs["spec"]["rayClusterConfig"]
    out = [("head", rc["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in rc["workerGroupSpecs"]]
    return out
