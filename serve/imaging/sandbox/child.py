"""The decoder child: confine this process, then decode one untrusted input and write the reply.

Run only by :mod:`serve.imaging.sandbox.runner` as ``python -I -m serve.imaging.sandbox.child
REQUEST`` in a fresh interpreter with an empty environment. The order matters:
the sandbox is complete (:func:`confine`) before the input is opened, and
before numpy, nibabel or ITK are imported, while this process has a single
thread (Landlock binds the calling thread and those it creates later).

``REQUEST`` is JSON: ``{"input": path, "workdir": path, "max_voxels": int,
"self_contained": bool, "policy": SandboxPolicy fields}``; ``"input": null`` only probes the layers.
Exit codes: 0 reply written, 3 input refused (``error.json``), 4 a required
layer is missing, anything else (or a signal) a crash.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
from pathlib import Path

from serve.imaging.sandbox import landlock, seccomp
from serve.imaging.sandbox.policy import library_paths

EXIT_OK, EXIT_REFUSED, EXIT_LAYER_MISSING = 0, 3, 4
#: What the interpreter and the readers' libraries take of the address-space limit before any decoding.
INTERPRETER_BYTES = 512 << 20


#: Seconds of CPU between the soft limit's SIGXCPU and the hard limit's SIGKILL.
CPU_HARD_MARGIN_S = 5


def apply_rlimits(policy: dict) -> None:
    """Address space, CPU, file size, open files, processes and core dumps, soft and hard alike but CPU's.

    The CPU hard limit sits a little above the soft one: at the soft limit the kernel sends SIGXCPU, which ends
    the child and names the limit, while a hard limit reached at once is a SIGKILL, which the parent could not
    tell from a kill from outside (Ray stopping the replica), which it retries. The child installs no handler
    for SIGXCPU; the hard limit stays the backstop.
    """
    cpu_s = int(policy["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + CPU_HARD_MARGIN_S))
    for res, value in ((resource.RLIMIT_AS, policy["memory_bytes"]),
                       (resource.RLIMIT_FSIZE, policy["file_bytes"]), (resource.RLIMIT_NOFILE, policy["open_files"]),
                       (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (int(value), int(value)))


def confine(policy: dict, readable: list[str], writable: list[str]) -> dict[str, bool]:
    """Apply every sandbox layer this kernel offers; return which are active.

    Args:
        policy: :meth:`serve.imaging.sandbox.policy.SandboxPolicy.to_json`.
        readable: paths the child may read besides the interpreter and libraries (the input).
        writable: folders it may write (its work folder).

    Returns:
        ``{layer: active}`` for each of :data:`serve.imaging.sandbox.policy.LAYERS`.
    """
    layers = dict.fromkeys(("rlimits", "no_new_privs", "seccomp", "landlock"), False)
    seccomp.preload()  # finding libseccomp runs ldconfig: before the limits forbid new processes
    apply_rlimits(policy)
    layers["rlimits"] = True
    rules = [landlock.Rule(p, landlock.READ_ONLY) for p in library_paths()]
    rules += [landlock.Rule(Path(p), landlock.READ_ONLY) for p in readable]
    rules += [landlock.Rule(Path(p), landlock.READ_WRITE) for p in writable]
    rules.append(landlock.Rule(Path("/dev/null"), landlock.READ_FILE | landlock.WRITE_FILE))
    try:
        landlock.restrict(rules)
        layers["landlock"] = True
    except OSError:
        pass
    try:
        seccomp.install()  # sets no_new_privs too
        layers["seccomp"] = True
    except OSError:
        pass
    layers["no_new_privs"] = _no_new_privs()
    return layers


def _no_new_privs() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(39, 0, 0, 0, 0) != 1:  # PR_GET_NO_NEW_PRIVS
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, where nothing above set it
    return libc.prctl(39, 0, 0, 0, 0) == 1


def main(argv: list[str]) -> int:
    request = json.loads(argv[-1])
    policy, workdir = request["policy"], Path(request["workdir"])
    out = workdir / "out"
    src, self_contained = request.get("input"), request.get("self_contained", True) is not False
    readable = [src] if src else []
    if src and not self_contained and src.lower().endswith((".mhd", ".nhdr")):
        readable.append(str(Path(src).parent))  # a detached header's data file: its own folder, nothing else
    layers = confine(policy, readable, [str(workdir)])
    missing = [name for name in policy["require"] if not layers.get(name)]
    # lazy: after confine(): the sandbox is complete before numpy and the readers load
    from serve.imaging.sandbox import reply

    if src is None or missing:  # a probe, or a sandbox too weak to decode in
        (out / "layers.json").write_text(json.dumps(layers))
        return EXIT_LAYER_MISSING if missing else EXIT_OK
    # lazy: after confine(): the sandbox is complete before numpy and the readers load
    from serve.errors import MrisegError
    from serve.imaging.volume_io import read_volume

    try:
        volume = read_volume(src, int(request["max_voxels"]), self_contained=self_contained,
                             max_extract_bytes=int(policy["extract_bytes"]),
                             max_decode_bytes=int(policy["memory_bytes"]) - INTERPRETER_BYTES)
    except MrisegError as e:
        reply.write_error(out, e.status, e.title, e.message, type(e).__name__)
        return EXIT_REFUSED
    except MemoryError:
        reply.write_error(out, 413, "Volume too large",
                          f"decoding the input needs more than the decoder's memory limit of "
                          f"{policy['memory_bytes'] >> 20} MiB; crop or downsample it first", "VolumeTooLargeError")
        return EXIT_REFUSED
    reply.write_volume(out, volume, layers)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
