"""Where TotalSegmentator 2.18 lives for the tests: the side venv ``.venv-ts`` that scripts/bootstrap.sh
builds, how it is run, and what its installed package says (``ts_driver.py describe``).

Tests that need it call :func:`require_side_venv`: absent, they are skipped with the reason, except
where ``MRISEG_REQUIRE_TOTALSEG=1`` (scripts/test.sh sets it, so CI fails instead).
"""

from __future__ import annotations

import json
import os
import subprocess
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("ts_driver.py")
#: set by scripts/test.sh (so in CI): a missing side venv fails the TotalSegmentator tests instead of skipping them
REQUIRE_ENV = "MRISEG_REQUIRE_TOTALSEG"
#: the side venv's interpreter (scripts/bootstrap.sh builds ``.venv-ts``); overridable for other layouts
PYTHON_ENV = "MRISEG_TOTALSEG_PYTHON"


def side_python() -> Path:
    """The side venv's python (``$MRISEG_TOTALSEG_PYTHON``, else ``.venv-ts/bin/python`` in the repo)."""
    return Path(os.environ.get(PYTHON_ENV) or REPO / ".venv-ts" / "bin" / "python")


def require_side_venv() -> Path:
    """The side venv's python; skips the calling test where it is absent, or fails where CI requires it."""
    import pytest

    py = side_python()
    if py.is_file() and os.access(py, os.X_OK):
        return py
    why = (f"TotalSegmentator's side venv is absent ({py}): 'make setup' (scripts/bootstrap.sh) builds it; "
           f"{PYTHON_ENV} can name another interpreter that has TotalSegmentator==2.18.0")
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{why} ({REQUIRE_ENV}=1: CI requires it)")
    pytest.skip(why)


def side_env(home: Path | None = None, proxy: str | None = None) -> dict[str, str]:
    """The environment TotalSegmentator runs in: its home, one CPU thread per worker, and every proxy
    variable pointed at ``proxy`` (a recorder that sees any attempt to reach the network)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "nnunet_results", "nnunet_raw",
            "nnunet_preprocessed", "totalseg_weights_path", "pythonpath", "virtual_env")}
    env.update(OMP_NUM_THREADS="1", nnUNet_def_n_proc="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    if home is not None:
        env.update(HOME=str(home), TOTALSEG_HOME_DIR=str(home / ".totalsegmentator"))
    if proxy is not None:
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            env[k] = proxy
    return env


@lru_cache(maxsize=1)
def describe() -> dict:
    """The installed TotalSegmentator's class maps, task configs and weights folders (``ts_driver.py describe``)."""
    py = require_side_venv()
    out = subprocess.run([str(py), str(DRIVER), "describe"], capture_output=True, text=True, timeout=120,
                         env=side_env(), cwd=DRIVER.parent)
    if out.returncode != 0:
        raise RuntimeError(f"ts_driver.py describe failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)
