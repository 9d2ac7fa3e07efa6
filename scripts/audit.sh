#!/usr/bin/env bash
# Dependency audit: every pin in requirements/constraints.txt against PyPI's advisory data (or OSV with
# `make audit AUDIT_ARGS="-s osv"`). --strict fails when a pin cannot be checked at all, so an offline run is
# an error, never a silent pass. Needs a network that reaches pypi.org (or api.osv.dev).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
[[ -x .venv-tools/bin/python ]] || "$PY" -m venv .venv-tools
[[ -x .venv-tools/bin/pip-audit ]] || .venv-tools/bin/pip install -q pip-audit==2.10.1
exec .venv-tools/bin/pip-audit --strict --no-deps --disable-pip -r requirements/constraints.txt ${AUDIT_ARGS:-} "$@"
