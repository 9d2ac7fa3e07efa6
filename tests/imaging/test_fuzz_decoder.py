"""The atheris fuzz target of the volume decoder: CI replays its saved corpus; a deep run grows that corpus.

CI (``make test``) replays ``tests/imaging/fuzz/corpus/`` (inputs earlier deep runs found new coverage with) and the
seeds through the in-process decoder, once each (libFuzzer's ``-runs=0``): seconds, not a time budget, and the
same inputs on every run, so a finding means the decoder changed. The sandboxed runs stay as they were:
``MRISEG_SANDBOXED_FUZZ_SECONDS`` of fuzzing through the real sandbox, and the injected-crash run.

The deep run (``make test-deep``; marker ``deep``, left out of the default run) fuzzes from that corpus for
``MRISEG_FUZZ_SECONDS`` (default 300 s) with libFuzzer seed ``MRISEG_FUZZ_SEED``. Its new inputs go to a
temporary folder; how to merge them into the committed corpus is in docs/reliability.md. A finding fails a
test with libFuzzer's report and the crashing input in base64; reproduce it with
``python tests/imaging/fuzz/fuzz_volume_decoder.py <crash-file>``, fix the decoder, and add a generator for the
input to tests/helpers/hostile_corpus.py.
"""
from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "tests" / "imaging" / "fuzz" / "fuzz_volume_decoder.py"
#: What deep runs found: inputs that reached new code, minimised with libFuzzer's -merge=1.
SAVED_CORPUS = ROOT / "tests" / "imaging" / "fuzz" / "corpus"
FUZZ_SECONDS = int(os.environ.get("MRISEG_FUZZ_SECONDS", "300"))
FUZZ_SEED = int(os.environ.get("MRISEG_FUZZ_SEED", "20261123"))
#: Far below what a healthy run does (thousands); a target that hangs or never starts stays under it.
MIN_RUNS = 50
#: The sandboxed target starts a child per input (about 2 inputs a second on 2 cores).
SANDBOXED_FUZZ_SECONDS = int(os.environ.get("MRISEG_SANDBOXED_FUZZ_SECONDS", "12"))


def _report(log: str, artifacts: list[Path]) -> str:
    found = [f"{p.name}: {base64.b64encode(p.read_bytes()[:4096]).decode()}" for p in artifacts]
    return "\n".join([log[-6000:], *found])


def _fuzz(tmp_path: Path, seconds: int | None, min_runs: int, min_seeds: int = 40, start_from: Path | None = None,
          **env_extra: str) -> int:
    """Run the target for ``seconds``, or with ``seconds`` None replay its inputs once each (``-runs=0``);
    fail with libFuzzer's report on a finding or too few runs. The corpus starts as a copy of ``start_from``
    (libFuzzer adds to it). Returns how many inputs it ran."""
    import atheris  # noqa: F401  (a dev dependency: missing, the test must fail rather than skip)

    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    if start_from is not None:
        shutil.copytree(start_from, corpus)
    else:
        corpus.mkdir()
    artifacts.mkdir()
    env = {**os.environ, "MRISEG_FUZZ_SEED_DIR": str(tmp_path / "seeds"), "PYTHONUNBUFFERED": "1", **env_extra}
    budget = "-runs=0" if seconds is None else f"-max_total_time={seconds}"
    cmd = [sys.executable, str(TARGET), budget, f"-seed={FUZZ_SEED}", "-timeout=40",
           "-rss_limit_mb=2048", f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus)]
    with open(tmp_path / "fuzz.log", "wb") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=(seconds or 60) + 180)
    log = (tmp_path / "fuzz.log").read_text(errors="replace")
    found = sorted(artifacts.iterdir())
    assert proc.returncode == 0 and not found, _report(log, found)

    seeds = re.search(r"fuzz_volume_decoder: (\d+) seeds", log)
    assert seeds and int(seeds.group(1)) >= min_seeds, _report(log, [])
    runs = re.search(r"stat::number_of_executed_units: (\d+)", log)
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    assert runs and done, _report(log, [])
    assert int(runs.group(1)) >= min_runs, _report(log, [])
    return int(runs.group(1))


def test_the_saved_fuzz_corpus_replays_without_a_finding(tmp_path):
    """Every saved input and every seed goes through the decoder once: none may crash, hang or raise anything
    but a refusal (a 4xx MrisegError)."""
    saved = sorted(p for p in SAVED_CORPUS.iterdir() if p.is_file())
    assert len(saved) >= 50, f"the saved corpus {SAVED_CORPUS} holds {len(saved)} inputs; grow it with a deep run"
    # libFuzzer runs each distinct input once (a few seeds coincide), plus one empty input
    _fuzz(tmp_path, None, min_runs=len(saved) + 40, start_from=SAVED_CORPUS)


@pytest.mark.deep
def test_fuzz_volume_decoder_finds_nothing(tmp_path):
    _fuzz(tmp_path, FUZZ_SECONDS, MIN_RUNS, start_from=SAVED_CORPUS)


@pytest.mark.slow
def test_fuzz_sandboxed_decoder_finds_nothing(tmp_path):
    """The same target through the real sandbox, one confined child per input, as the router decodes."""
    _fuzz(tmp_path, SANDBOXED_FUZZ_SECONDS, 5, min_seeds=12, MRISEG_FUZZ_SANDBOXED="1")


@pytest.mark.slow
def test_fuzz_sandboxed_injected_crash_is_a_422(tmp_path):
    """Every child segfaults after confining itself: each input must come back as a 422 naming the crash
    (the target raises, and libFuzzer reports a finding, for anything else)."""
    _fuzz(tmp_path, 6, 3, min_seeds=12, MRISEG_FUZZ_SANDBOXED="1", MRISEG_FUZZ_INJECT_CRASH="1")
