#!/usr/bin/env python3
"""atheris fuzz target for the volume decoder, ``serve.imaging.volume_io.read_volume_bytes``, in this process or
(``MRISEG_FUZZ_SANDBOXED=1``) through the sandboxed decoder the router uses, ``serve.imaging.sandbox``.

    python tests/imaging/fuzz/fuzz_volume_decoder.py -max_total_time=60 [corpus_dir] [more libFuzzer flags]

An input is ``payload + mode byte + suffix byte``; FuzzedDataProvider consumes integers from the end,
so the last byte picks the upload's suffix (one the decoder supports) and the one before it the mode:

* mode 0: the payload is the upload, as is;
* mode 1: the payload is a list of byte patches applied to a small valid volume of that format (its
  header, for NIfTI), which reaches the checks behind the magic bytes far more often than raw mutation.

A :class:`serve.errors.MrisegError` is a refusal, as designed. Any other exception escapes, so atheris
reports it as a crash and saves the input; native crashes (ITK, zlib) are caught by libFuzzer's signal
handler. Only ``serve`` is instrumented: numpy, nibabel and ITK would make every run much slower.

Seeds: the hostile corpus (tests/helpers/hostile_corpus.py; bombs and inputs over 64 KiB left out) and one small
valid volume per format, written at start-up to $MRISEG_FUZZ_SEED_DIR (default: a new temporary folder)
and appended to the corpus folders, so new inputs go to ``corpus_dir`` when one is given.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: tests.helpers.hostile_corpus must be importable

with atheris.instrument_imports(include=["serve"]):
    from serve.imaging import volume_io
    from serve.imaging import volume
    from serve.errors import MrisegError

#: Small enough that no single input can decode for long.
MAX_VOXELS = 64**3
MAX_SEED_BYTES = 64 * 1024
SUFFIXES: tuple[str, ...] = volume.SUPPORTED
MODES = ("raw", "patch")
NIFTI_HEADER_BYTES = 352

_VALID: dict[str, bytes] = {}  # suffix -> a small valid upload, the base of mode 1


def decode(data: bytes) -> tuple[str, str, atheris.FuzzedDataProvider]:
    """The suffix and mode an input selects, and the provider positioned at its payload."""
    fdp = atheris.FuzzedDataProvider(data)
    suffix = SUFFIXES[fdp.ConsumeIntInRange(0, len(SUFFIXES) - 1)]
    mode = MODES[fdp.ConsumeIntInRange(0, len(MODES) - 1)]
    return suffix, mode, fdp


def encode(payload: bytes, suffix: str, mode: str = "raw") -> bytes:
    """The input that :func:`decode` reads back as (suffix, mode, payload)."""
    data = payload + bytes([MODES.index(mode), SUFFIXES.index(suffix)])
    got_suffix, got_mode, fdp = decode(data)
    assert (got_suffix, got_mode) == (suffix, mode) and fdp.ConsumeBytes(fdp.remaining_bytes()) == payload
    return data


def patched(fdp: atheris.FuzzedDataProvider, suffix: str) -> bytes:
    """A valid upload of ``suffix`` with up to 8 fuzzer-chosen byte patches."""
    base = _VALID[suffix]
    gz = suffix == ".nii.gz"
    buf = bytearray(gzip.decompress(base) if gz else base)
    # NIfTI: the header is where the decisions are; the voxel data is only ever cast
    span = NIFTI_HEADER_BYTES if suffix in (".nii", ".nii.gz") else len(buf)
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        at = fdp.ConsumeIntInRange(0, span - 1)
        patch = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
        buf[at: at + len(patch)] = patch
    return gzip.compress(bytes(buf), mtime=0) if gz else bytes(buf)


def TestOneInput(data: bytes) -> None:
    """One upload through the decoder; anything but a MrisegError propagates as a finding."""
    suffix, mode, fdp = decode(data)
    if mode == "patch" and suffix in _VALID:
        upload = patched(fdp, suffix)
    else:
        upload = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        _DECODE(upload, f"upload{suffix}")
    except MrisegError as e:
        if not (400 <= e.status < 500):
            raise AssertionError(f"a decoder refusal must be a 4xx, got {e.status}: {e.message}") from e
        reached_a_child = upload and suffix not in (".mhd", ".nhdr")  # the parent refuses the others itself
        if INJECT_CRASH and reached_a_child and not (e.status == 422 and "SIGSEGV" in e.message):
            raise AssertionError(f"an injected crash must be a 422 naming it, got {e.status}: {e.message}") from e
    else:
        if INJECT_CRASH:
            raise AssertionError("a child that crashed was taken for a decoded volume")


def _in_process(upload: bytes, filename: str) -> None:
    volume_io.read_volume_bytes(upload, filename, max_voxels=MAX_VOXELS)


#: How each input is decoded: in this process (fast, instrumented), or through the real sandbox
#: (MRISEG_FUZZ_SANDBOXED=1: a confined child per input, as the router does it; about 2 inputs a second).
_DECODE = _in_process
#: MRISEG_FUZZ_INJECT_CRASH=1 (with MRISEG_FUZZ_SANDBOXED): every child segfaults after confining itself;
#: each input must then come back as a 422 that names the crash.
INJECT_CRASH = os.environ.get("MRISEG_FUZZ_INJECT_CRASH") == "1"
_CRASHING_CHILD = ("import ctypes, json, sys; from serve.imaging.sandbox.child import confine; "
                   "r = json.loads(sys.argv[-1]); confine(r['policy'], [], [r['workdir']]); ctypes.string_at(0)")


def _sandboxed() -> None:
    global _DECODE
    from serve.imaging.sandbox import LAYERS, SandboxedDecoder, SandboxPolicy

    policy = SandboxPolicy(scratch_dir=tempfile.mkdtemp(prefix="mriseg-fuzz-scratch-"), require=LAYERS, wall_s=30)
    entry = ("-c", _CRASHING_CHILD) if INJECT_CRASH else SandboxedDecoder.entry
    decoder = SandboxedDecoder(policy, entry=entry)
    _DECODE = lambda upload, filename: decoder.decode_bytes(upload, filename, MAX_VOXELS)  # noqa: E731


def _valid_uploads() -> dict[str, bytes]:
    """One small valid volume per format (DICOM: a 3-slice series in a zip, and one slice)."""
    import nibabel as nib
    import numpy as np
    import SimpleITK as sitk

    from tests.helpers.hostile_corpus import _dicom_slices

    arr = (np.arange(8 * 7 * 6) % 97).astype(np.int16).reshape(8, 7, 6)
    img = nib.Nifti1Image(arr, np.diag([1.2, 1.3, 2.0, 1.0]))
    img.set_qform(img.affine, code=1)
    nii = img.to_bytes()
    out = {".nii": nii, ".nii.gz": gzip.compress(nii, mtime=0)}
    simg = sitk.GetImageFromArray(np.transpose(arr, (2, 1, 0)).copy())
    with tempfile.TemporaryDirectory(prefix="mriseg-fuzz-") as d:
        for suffix in (".mha", ".nrrd"):
            sitk.WriteImage(simg, str(Path(d) / f"v{suffix}"))
            out[suffix] = (Path(d) / f"v{suffix}").read_bytes()
    slices = _dicom_slices(3)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, payload in slices:
            zf.writestr(zipfile.ZipInfo(f"series/{name}", date_time=(2024, 1, 1, 0, 0, 0)), payload)
    out[".zip"] = buf.getvalue()
    out[".dcm"] = slices[0][1]
    return out


def write_seeds(folder: Path) -> int:
    """Write the seed inputs into ``folder``; return how many."""
    from tests.helpers.hostile_corpus import corpus

    folder.mkdir(parents=True, exist_ok=True)
    seeds = [encode(data, suffix) for suffix, data in _VALID.items()]
    # an empty patch list leaves the valid volume as it is: libFuzzer grows the patches from there
    seeds += [encode(b"", suffix, "patch") for suffix in _VALID]
    # through the sandbox (a child per input) only the valid volumes: the corpus is replayed through the real
    # API by tests/cluster/test_hostile.py, and replaying it here would take the whole time budget
    for h in ([] if _DECODE is not _in_process else corpus()):
        suffix = volume.suffix_of(h.filename)
        if len(h.data) <= MAX_SEED_BYTES and suffix in SUFFIXES:
            seeds.append(encode(h.data, suffix))
    for seed in seeds:
        (folder / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    return len(seeds)


def _quiet() -> None:
    """Drop the readers' own warnings: millions of them would bury libFuzzer's report."""
    import SimpleITK as sitk

    warnings.simplefilter("ignore")
    for name in ("nibabel", "nibabel.global"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)


def main(argv: list[str]) -> None:
    """Write the seeds, then fuzz until libFuzzer's own limits stop it (it exits the process)."""
    _quiet()
    if os.environ.get("MRISEG_FUZZ_SANDBOXED") == "1":
        _sandboxed()
    _VALID.update(_valid_uploads())
    seed_dir = Path(os.environ.get("MRISEG_FUZZ_SEED_DIR") or tempfile.mkdtemp(prefix="mriseg-fuzz-seeds-"))
    n = write_seeds(seed_dir)
    print(f"fuzz_volume_decoder: {n} seeds in {seed_dir}", file=sys.stderr, flush=True)
    args = list(argv)
    if not any(a.startswith("-max_len=") for a in args):
        args.append(f"-max_len={MAX_SEED_BYTES}")
    if not any(Path(a).is_file() for a in args[1:] if not a.startswith("-")):  # files given: reproduce them
        args.append(str(seed_dir))
    atheris.Setup(args, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
