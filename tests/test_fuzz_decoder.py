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


def _report(log: str, artifacts: list[Path]) -> str:
    found = [f"{p.name}: {base64.b64encode(p.read_bytes()[:4096]).decode()}" for p in artifacts]
    return "\n".join([log[-6000:], *found])


@pytest.mark.slow
def test_fuzz_volume_decoder_finds_nothing(tmp_path):
    import atheris  # noqa: F401  (a dev dependency: missing, the test must fail rather than skip)

    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    corpus.mkdir()
    artifacts.mkdir()
    env = {**os.environ, "MRISEG_FUZZ_SEED_DIR": str(tmp_path / "seeds"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(TARGET), f"-max_total_time={FUZZ_SECONDS}", f"-seed={FUZZ_SEED}", "-timeout=20", "-rss_limit_mb=2048",
           f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus)]
    with open(tmp_path / "fuzz.log", "wb") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=FUZZ_SECONDS + 180)
    log = (tmp_path / "fuzz.log").read_text(errors="replace")
    found = sorted(artifacts.iterdir())
    assert proc.returncode == 0 and not found, _report(log, found)

    seeds = re.search(r"fuzz_volume_decoder: (\d+) seeds", log)
    assert seeds and int(seeds.group(1)) >= 40, _report(log, [])
    runs = re.search(r"stat::number_of_executed_units: (\d+)", log)
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    assert runs and done, _report(log, [])
    assert int(runs.group(1)) >= MIN_RUNS, _report(log, [])
