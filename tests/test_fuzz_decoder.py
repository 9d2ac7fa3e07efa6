"""The atheris fuzz target of the volume decoder runs for a bounded time without a finding.

MRISEG_FUZZ_SECONDS sets the fuzzing time (default 45 s) and MRISEG_FUZZ_SEED libFuzzer's seed (default
fixed, so CI replays the same input sequence: a new finding shows up when the decoder changes, not at random;
set another seed, or run the target by hand, to explore further). A finding fails the test with libFuzzer's
report and the crashing input in base64; reproduce it with
``python tests/fuzz/fuzz_volume_decoder.py <crash-file>``, fix the decoder, and add a generator for the
input to tests/hostile_corpus.py.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "tests" / "fuzz" / "fuzz_volume_decoder.py"
FUZZ_SECONDS = int(os.environ.get("MRISEG_FUZZ_SECONDS", "45"))
FUZZ_SEED = int(os.environ.get("MRISEG_FUZZ_SEED", "20261123"))
#: Far below what a healthy run does (thousands); a target that hangs or never starts stays under it.
MIN_RUNS = 50
#: The sandboxed target starts a child per input (about 2 inputs a second on 2 cores).
SANDBOXED_FUZZ_SECONDS = int(os.environ.get("MRISEG_SANDBOXED_FUZZ_SECONDS", "12"))


def _report(log: str, artifacts: list[Path]) -> str:
    found = [f"{p.name}: {base64.b64encode(p.read_bytes()[:4096]).decode()}" for p in artifacts]
    return "\n".join([log[-6000:], *found])


def _fuzz(tmp_path: Path, seconds: int, min_runs: int, min_seeds: int = 40, **env_extra: str) -> None:
    """Run the target for ``seconds``; fail with libFuzzer's report on a finding or too few runs."""
    import atheris  # noqa: F401  (a dev dependency: missing, the test must fail rather than skip)

    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    corpus.mkdir()
    artifacts.mkdir()
    env = {**os.environ, "MRISEG_FUZZ_SEED_DIR": str(tmp_path / "seeds"), "PYTHONUNBUFFERED": "1", **env_extra}
    cmd = [sys.executable, str(TARGET), f"-max_total_time={seconds}", f"-seed={FUZZ_SEED}", "-timeout=40",
           "-rss_limit_mb=2048", f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus)]
    with open(tmp_path / "fuzz.log", "wb") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=seconds + 180)
    log = (tmp_path / "fuzz.log").read_text(errors="replace")
    found = sorted(artifacts.iterdir())
    assert proc.returncode == 0 and not found, _report(log, found)

    seeds = re.search(r"fuzz_volume_decoder: (\d+) seeds", log)
    assert seeds and int(seeds.group(1)) >= min_seeds, _report(log, [])
    runs = re.search(r"stat::number_of_executed_units: (\d+)", log)
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    assert runs and done, _report(log, [])
    assert int(runs.group(1)) >= min_runs, _report(log, [])


@pytest.mark.slow
def test_fuzz_volume_decoder_finds_nothing(tmp_path):
    _fuzz(tmp_path, FUZZ_SECONDS, MIN_RUNS)


@pytest.mark.slow
def test_fuzz_sandboxed_decoder_finds_nothing(tmp_path):
    """The same target through the real sandbox, one confined child per input, as the router decodes."""
    _fuzz(tmp_path, SANDBOXED_FUZZ_SECONDS, 5, min_seeds=12, MRISEG_FUZZ_SANDBOXED="1")


@pytest.mark.slow
def test_fuzz_sandboxed_injected_crash_is_a_422(tmp_path):
    """Every child segfaults after confining itself: each input must come back as a 422 naming the crash
    (the target raises, and libFuzzer reports a finding, for anything else)."""
    _fuzz(tmp_path, 6, 3, min_seeds=12, MRISEG_FUZZ_SANDBOXED="1", MRISEG_FUZZ_INJECT_CRASH="1")
