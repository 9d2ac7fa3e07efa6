#!/usr/bin/env bash
# Create .venv with every runtime and test dependency, pinned. Idempotent:
# re-runs only when a requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.mriseg-installed
want=$(cat pyproject.toml requirements/*.txt scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then exit 0; fi
[[ -d .venv ]] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
q=(-q)
# 1. torch first, pinned: an unpinned torch would be a multi-GB CUDA download. Where the pip
#    index serves the CUDA build for this pin (PyPI on Linux does), set
#    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
if python -c 'import torch' 2>/dev/null; then :; else
  pip install "${q[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION:-2.13.0}"
fi
# 2. Everything else, pinned.
pip install "${q[@]}" -c requirements/constraints.txt -r requirements/base.txt
# 3. nnU-Net without its timm/torchvision dependencies.
pip install "${q[@]}" --no-deps -c requirements/constraints.txt -r requirements/nnunet-nodeps.txt
# 4. checkov (manifest policy checks in tests) in its own venv: its pins clash with ours.
[[ -x .venv-tools/bin/checkov ]] || { "$PY" -m venv .venv-tools && .venv-tools/bin/pip install "${q[@]}" checkov==3.3.30; }
# 5. The real TotalSegmentator for the parity tests (tests/parity/) in a side venv, without its
#    dependencies: a .pth file adds .venv's site-packages, so it runs on the very torch, nnunetv2,
#    nibabel and scipy that mriseg runs on. Only what its MR path imports and .venv lacks is added.
python -m venv --clear .venv-ts
.venv-ts/bin/pip install "${q[@]}" --no-deps -r requirements/totalseg-parity.txt
python -c 'import sysconfig; print("\n".join(sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})))' \
  > "$(.venv-ts/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/mriseg-venv.pth"
.venv-ts/bin/python -c 'import totalsegmentator.nnunet, totalsegmentator.bin.TotalSegmentator'
python -c 'import serve, nnunetv2, ray, torch; print("mriseg-serve ready: torch", torch.__version__, "ray", ray.__version__)'
echo "$want" > "$stamp"
