"""What the decoder child may use: its limits, the files it may touch, the layers that must hold.

One :class:`SandboxPolicy` serves every path that decodes untrusted bytes (the
router, the event intake, the SQS consumer, ``mriseg bulk --local-models``,
``mriseg segment``); the settings that build it come from the router's
``sandbox`` mapping in the Serve config, or the defaults here.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Annotated, Any, Mapping

from pydantic import BaseModel, Field, StrictStr, field_validator

import serve
from serve.settings_checks import STRICT, Says, check, number, whole

#: The layers the child applies; each is reported as active or not.
LAYERS: tuple[str, ...] = ("rlimits", "no_new_privs", "seccomp", "landlock")


def default_scratch_dir() -> str:
    """Where work folders of decoder children go: ``$MRISEG_SCRATCH_DIR``, else the system temp folder."""
    return os.environ.get("MRISEG_SCRATCH_DIR") or tempfile.gettempdir()


class SandboxPolicy(BaseModel):
    """Limits of one decoder child (all bytes are bytes, all times seconds).

    ``memory_bytes`` bounds the child's address space (the interpreter and its
    libraries take about 0.4 GiB of it); ``extract_bytes`` bounds what a DICOM
    zip may expand to in all. Any one file the child writes (the decoded
    volume, a canonical .mha/.nrrd copy, an extracted slice) is bounded by 8
    bytes a voxel of the largest volume the caller accepts. ``require`` names the layers without
    which no input is decoded (:data:`LAYERS`).
    """

    model_config = STRICT

    memory_bytes: whole(256 << 20) = 3 << 30
    cpu_s: whole(1) = 120
    wall_s: number(1) = 300.0
    extract_bytes: whole(1 << 20) = (1 << 30) + (64 << 20)
    open_files: whole(16) = 256
    scratch_dir: Annotated[StrictStr, Field(min_length=1), Says("a folder path")] = Field(
        default_factory=default_scratch_dir)
    require: Annotated[tuple[StrictStr, ...], Says(f"a list of layer names from {', '.join(LAYERS)}")] = (
        "rlimits", "no_new_privs", "seccomp")

    @field_validator("require")
    @classmethod
    def _known_layers(cls, require: tuple[str, ...]) -> tuple[str, ...]:
        bad = [x for x in require if x not in LAYERS]
        if bad:
            raise ValueError(f"unknown layer(s) {bad} in require; known: {', '.join(LAYERS)}")
        return require

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> "SandboxPolicy":
        """Build a policy from a config mapping (the router's ``sandbox`` key).

        Args:
            d: keys as the fields of this class; missing keys keep their defaults.

        Returns:
            The validated policy.

        Raises:
            MrisegError: an unknown key, a number out of range, or an unknown layer name.
        """
        return check(cls, d, "sandbox")

    def to_json(self) -> dict[str, Any]:
        """The policy as JSON-able values (what the parent hands the child)."""
        out = self.model_dump()
        out["require"] = list(self.require)
        return out


def library_paths() -> list[Path]:
    """Folders the child may read: the interpreter, its standard library and site-packages, system libraries.

    Called in the child (``python -I``: no current folder or user site on ``sys.path``).

    Returns:
        Existing folders (and ``/etc/ld.so.cache``), each once.
    """
    names = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    names.update(v for k, v in sysconfig.get_paths().items() if k in ("stdlib", "platstdlib", "purelib", "platlib"))
    names.update(p for p in sys.path if p and os.path.isdir(p))
    # an editable install maps the package to the source tree (not on sys.path): the package folder alone,
    # the whole of serve/ (the readers import serve.errors and more), wherever this module sits in it
    names.add(str(Path(serve.__file__).resolve().parent))
    names.update(("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/etc/ld.so.cache",
                  "/usr/share/zoneinfo"))
    out, seen = [], set()
    for n in sorted(names):
        p = Path(os.path.realpath(n))
        if p.exists() and p not in seen:
            seen.add(p)
            out.append(p)
    return out
