#!/usr/bin/env bash
# One prepared run for a lent GPU machine (the workplace's `device` tool; see docs/performance.md and
# docs/demo-models.md): a CUDA check of the in-process core, the in-process benchmark and the batching
# measurement on the GPU, then a demo-model training stage with what is left of DEADLINE_S.
#
#   bash scripts/gpu_lease.sh [train_demo_models.py arguments for the stage]
#
# DEVICE (default cuda) can be set to cpu for a dry run of this script on a machine without a GPU.
# The machine has CUDA torch, numpy, scipy and scikit-image but not nnunetv2 and the rest of our import
# closure: those come as wheels in .whl/ (carried; see docs/demo-models.md for the list). SimpleITK's wheel
# (52 MB) does not fit the 64 MiB carry, so an import-only placeholder stands in for it: nnunetv2 imports
# it at module level, and nothing run here reads or writes a file through it (the models' plans name
# nibabel's reader). Everything comes back in $OUT: device.log, results.tar (bench + batching),
# weights-1.tar and weights-2.tar (three model folders each, under 16 MiB), train.log.
set -u
t0=$(date +%s)
deadline=$((t0 + ${DEADLINE_S:-540}))
dev=${DEVICE:-cuda}
out=${OUT:?run me through the device tool, which sets OUT}
log="$out/device.log"
left() { echo $((deadline - $(date +%s))); }
say() { echo "[gpu_lease +$(( $(date +%s) - t0 ))s] $*" | tee -a "$log"; }

mkdir -p /tmp/site/SimpleITK
for w in .whl/*.whl; do python3 -m zipfile -e "$w" /tmp/site || { say "cannot unpack $w"; exit 1; }; done
cat > /tmp/site/SimpleITK/__init__.py <<'EOF'
"""Placeholder: SimpleITK is not on this machine. Only imported, never called, by what gpu_lease.sh runs."""


def __getattr__(name):
    raise ImportError(f"SimpleITK is not installed on this machine (SimpleITK.{name} was asked for)")
EOF
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv >> "$log" 2>&1
python3 - >> "$log" 2>&1 <<'EOF' || { say "environment check failed (see above)"; exit 1; }
import os

import nibabel, nnunetv2, numpy, scipy, torch  # noqa: F401
from serve.inference.modelstore import ModelStore
from serve.phantoms import make_phantom
from serve.inference.pipeline import Segmenter

print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "numpy", numpy.__version__,
      "scipy", scipy.__version__, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
# the CUDA check: the in-process core on the GPU gives the CPU's labels on a demo phantom
vol = make_phantom(10000000).volume
cpu = Segmenter(ModelStore(["serve/demo_models"]), device="cpu", threads=4).segment(vol)
gpu = Segmenter(ModelStore(["serve/demo_models"]), device=os.environ.get("DEVICE", "cuda"), threads=4).segment(vol)
a, b = cpu.labels, gpu.labels
print("cuda check: voxels", a.size, "labels differing", int((a != b).sum()),
      "structures cpu", len(set(a.ravel().tolist())), "gpu", len(set(b.ravel().tolist())))
EOF
say "environment and CUDA check done ($(left)s left)"

mkdir -p /tmp/results
# BENCH_S=0 or BATCHING_S=0 skips that step (to leave the lease to training)
if [ "${BENCH_S:-240}" -gt 0 ]; then
    timeout "${BENCH_S:-240}" python3 -m loadtest.bench --target inprocess --device "$dev" --sizes small \
        --out /tmp/results --note "lent GPU machine, in-process target (Ray does not fit the carry)" >> "$log" 2>&1
    say "bench exit $? ($(left)s left)"
fi
if [ "${BATCHING_S:-60}" -gt 0 ]; then
    timeout "${BATCHING_S:-60}" python3 -m loadtest.batching --device "$dev" --precision bf16 --tiles 32 \
        --batch-sizes 1 2 4 8 --label gpu >> "$log" 2>&1 && cp loadtest/results/batching-gpu.* /tmp/results/
    say "batching exit $? ($(left)s left)"
fi
tar -cf "$out/results.tar" -C /tmp/results .

if [ $# -gt 0 ]; then
    # what is left, less the phantoms' preparation (PREP_S) and 40 s to save, compact and pack
    budget=$(( $(left) - ${PREP_S:-110} - 40 ))
    if [ "$budget" -lt 60 ]; then say "only ${budget}s for training: skipped"; exit 0; fi
    say "training for ${budget}s"
    # a watchdog: should preparation overrun, stop 30 s before the deadline and keep the last saved folders
    timeout $(( $(left) - 30 )) python3 -m training.train_demo_models --out /tmp/stage --budget "$budget" \
        --device "$dev" --save-every 60 "$@" > "$out/train.log" 2>&1
    say "training exit $? ($(left)s left)"
    ls /tmp/stage > /dev/null 2>&1 || exit 1
    mapfile -t folders < <(cd /tmp/stage && ls -d Dataset*)
    half=$(( (${#folders[@]} + 1) / 2 ))
    tar -cf "$out/weights-1.tar" -C /tmp/stage DEMO_MODELS.json "${folders[@]:0:$half}" 2>> "$log" || \
        tar -cf "$out/weights-1.tar" -C /tmp/stage "${folders[@]:0:$half}"
    tar -cf "$out/weights-2.tar" -C /tmp/stage "${folders[@]:$half}"
    say "packed ${#folders[@]} model folders ($(left)s left)"
fi
