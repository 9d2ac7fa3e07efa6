#!/usr/bin/env bash
# The whole test suite, as CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
# the TotalSegmentator parity tests fail, not skip, without the side venv .venv-ts that setup builds
export MRISEG_REQUIRE_TOTALSEG=1
exec python -m pytest -q -p no:cacheprovider "$@"
