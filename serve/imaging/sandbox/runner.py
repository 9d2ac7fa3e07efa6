"""Decode untrusted bytes in a confined child process; what goes wrong there stays there.

The parent (the router, the intake, the consumer, the CLI) never parses an
input itself. It makes a private work folder, starts a *fresh* interpreter
(``exec``, never ``fork``: the parent's memory holds API keys and S3
credentials) with an empty environment and no inherited file descriptors, and
waits for it within a wall-clock limit. The child confines itself
(:mod:`serve.imaging.sandbox.child`) before it opens the input, and answers through
files in the fixed format of :mod:`serve.imaging.sandbox.reply`.

A crash, a timeout, a limit hit or a malformed reply is a 422 for that input
alone; the caller's process and every other job carry on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from serve.errors import ServiceUnavailableError
from serve.imaging.sandbox import reply
from serve.imaging.sandbox.child import EXIT_LAYER_MISSING, EXIT_OK, EXIT_REFUSED
from serve.imaging.sandbox.policy import LAYERS, SandboxPolicy

log = logging.getLogger(__name__)

#: Single-threaded numeric libraries (each child is one decode; the parent's cores are shared).
_CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "LC_ALL": "C.UTF-8"}


class DecodeCancelled(Exception):
    """The caller cancelled the decode; the child was killed."""


class SandboxUnavailableError(ServiceUnavailableError):
    """A layer the configuration requires is missing on this host: nothing is decoded here."""


class DecoderKilledError(ServiceUnavailableError):
    """The child was killed from outside its limits, twice: the host, not the input (503, resubmit as is)."""


#: What _run returns for a child it killed itself at the policy's wall-clock limit (a real exit code is >= -64).
KILLED_AT_DEADLINE = -1000

#: How long to wait before the one retry of a child killed from outside. Ray kills a replica's children first
#: when it stops the replica, then the replica: a decode that waits this long dies with its replica, its job
#: still "running" in the journal, and the next replica resumes it, rather than settling it as a bad input.
RETRY_AFTER_OUTSIDE_KILL_S = 2.0


@dataclass
class SandboxedDecoder:
    """Decodes inputs in confined children under one :class:`SandboxPolicy`.

    Args:
        policy: the limits and required layers.
        entry: the child's command after the interpreter (tests run attack scripts through the same runner).
    """

    policy: SandboxPolicy = field(default_factory=SandboxPolicy)
    entry: tuple[str, ...] = ("-m", "serve.imaging.sandbox.child")

    def probe(self) -> dict[str, bool]:
        """Start a child that confines itself and reports the layers it got (no input).

        Returns:
            ``{layer: active}`` for each of :data:`serve.imaging.sandbox.policy.LAYERS`.
        """
        with self._workdir() as work:
            code = self._run(work, None, max_voxels=1)
            path = work / "out" / "layers.json"
            layers = reply.read_json(path) if path.is_file() else {}
        if code not in (EXIT_OK, EXIT_LAYER_MISSING):
            raise SandboxUnavailableError(f"the decoder sandbox could not start (exit {_describe(code)})")
        return {name: layers.get(name) is True for name in LAYERS}

    def missing_layers(self, layers: dict[str, bool]) -> list[str]:
        """The layers :attr:`policy` requires that ``layers`` lacks."""
        return [name for name in self.policy.require if not layers.get(name)]

    def decode(self, path: str | os.PathLike, max_voxels: int, self_contained: bool = True,
               cancel: threading.Event | None = None):
        """Decode the file or DICOM folder at ``path`` in a confined child.

        Args:
            path: the input (read-only to the child; it never learns any other path of ours).
            max_voxels: the most voxels accepted (also bounds the reply's size).
            self_contained: refuse headers that keep their voxels in another file (.mhd, .nhdr). False is for
                a user's own files (``mriseg segment``): the child may then read the header's folder, and only it.
            cancel: set by another thread to stop the child early (a cancelled job); the decode then raises
                :class:`DecodeCancelled`.

        Returns:
            The :class:`serve.imaging.volume_io.Volume`, validated again on this side.

        Raises:
            MrisegError: the input was refused (its own 4xx), or the child crashed, timed out, hit a limit or
                broke the reply format (422); SandboxUnavailableError (503) when a required layer is missing;
                DecoderKilledError (503) when the child was killed from outside twice (a first such kill is
                retried after :data:`RETRY_AFTER_OUTSIDE_KILL_S`).
        """
        src = Path(path).resolve()
        volume = self._decode_once(src, max_voxels, self_contained, cancel)
        if volume is None:  # killed from outside: Ray stopping this replica, or the host out of memory
            log.warning("a decoder child was killed from outside its limits; retrying once in %.0f s",
                        RETRY_AFTER_OUTSIDE_KILL_S)
            if cancel is not None and cancel.wait(RETRY_AFTER_OUTSIDE_KILL_S):
                raise DecodeCancelled("the job was cancelled while its input was decoded")
            if cancel is None:
                time.sleep(RETRY_AFTER_OUTSIDE_KILL_S)
            volume = self._decode_once(src, max_voxels, self_contained, cancel)
            if volume is None:
                raise DecoderKilledError("the decoder was killed twice from outside its own limits (this server "
                                         "stopping, or its host out of memory), not for the input; the job can "
                                         "be resubmitted as is")
        return volume

    def _decode_once(self, src: Path, max_voxels: int, self_contained: bool, cancel: threading.Event | None):
        """One child's decode of ``src``.

        Returns:
            The volume, or None when the child was killed from outside (a SIGKILL that was not our deadline's).

        Raises:
            MrisegError: as :meth:`decode`, for every other way the child can end.
        """
        with self._workdir() as work:
            code = self._run(work, src, max_voxels, self_contained, cancel)
            if code == -signal.SIGKILL:
                return None
            out = work / "out"
            if code == EXIT_OK and (out / reply.META).is_file():
                return reply.read_volume(out, max_voxels)
            if code == EXIT_REFUSED and (out / reply.ERROR).is_file():
                raise reply.read_error(out / reply.ERROR)
            if code == EXIT_LAYER_MISSING:
                raise SandboxUnavailableError("this server's decoder sandbox lacks a layer its configuration "
                                              "requires (see the router's start-up log); the operators must fix "
                                              "the host. The job can be resubmitted as is later")
            raise reply.SandboxReplyError(
                f"the input could not be decoded: the decoder stopped ({_describe(code)}), as it does for a file "
                f"built to crash or exhaust it, or one too large to decode within its limits. Check that it is "
                f"an intact, supported volume")

    def decode_bytes(self, data: bytes, filename: str, max_voxels: int, cancel: threading.Event | None = None):
        """Decode an uploaded or downloaded file held in memory; only ``filename``'s suffix is used.

        Args:
            data: the file's bytes.
            filename: its name (never logged or kept: it may hold PHI).
            max_voxels: the most voxels accepted.
            cancel: see :meth:`decode`.

        Returns:
            The :class:`serve.imaging.volume_io.Volume`.
        """
        # lazy: the decoder child imports this package before confine(); the readers load only after it
        from serve.imaging.volume_io import check_upload

        suffix = check_upload(data, filename)
        with self._workdir() as work:
            path = work / f"input{suffix}"
            path.write_bytes(data)
            return self.decode(path, max_voxels, cancel=cancel)

    # -- internals --------------------------------------------------------------

    def _workdir(self):
        root = Path(self.policy.scratch_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix="mriseg-sbx-", dir=root))
        except OSError as e:
            raise ServiceUnavailableError(f"the decoder's scratch folder cannot be used ({e.strerror}); "
                                          f"the job can be resubmitted as is") from e
        return _Cleanup(work)

    def _run(self, work: Path, src: Path | None, max_voxels: int, self_contained: bool = True,
             cancel: threading.Event | None = None) -> int:
        (work / "out").mkdir()
        (work / "tmp").mkdir()
        pol = self.policy.to_json()
        # any one file the child writes: the float32 reply, or the canonical copy of a .mha/.nrrd (up to
        # 8 bytes a voxel), of the largest accepted volume
        pol["file_bytes"] = max_voxels * 8 + (16 << 20)
        request = {"input": None if src is None else str(src), "workdir": str(work), "max_voxels": max_voxels,
                   "self_contained": self_contained, "policy": pol}
        env = dict(_CHILD_ENV, TMPDIR=str(work / "tmp"))
        with open(work / "stderr.txt", "wb") as err:  # never logged: ITK quotes header text, which may be PHI
            try:
                proc = subprocess.Popen([sys.executable, "-I", *self.entry, json.dumps(request)], env=env,
                                        cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                        close_fds=True, start_new_session=True)
            except OSError as e:
                raise ServiceUnavailableError(f"the decoder could not be started ({e.strerror}); the job can be "
                                              f"resubmitted as is") from e
            deadline = time.monotonic() + self.policy.wall_s
            try:
                while True:
                    try:  # short waits, so that a cancel is seen within a tenth of a second
                        return proc.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
                    except subprocess.TimeoutExpired:
                        if cancel is not None and cancel.is_set():
                            _kill(proc)
                            raise DecodeCancelled("the job was cancelled while its input was decoded") from None
                        if time.monotonic() >= deadline:
                            _kill(proc)
                            return KILLED_AT_DEADLINE
            except BaseException:  # a cancelled job: the child must not outlive it
                _kill(proc)
                raise


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _describe(code: int) -> str:
    if code == KILLED_AT_DEADLINE:
        return "SIGKILL, killed: the time limit"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {"SIGXCPU": "the CPU-time limit",
                "SIGXFSZ": "the file-size limit", "SIGSEGV": "a crash", "SIGABRT": "an abort",
                "SIGSYS": "a forbidden system call"}.get(name)
        return f"{name}, {hint}" if hint else name
    return f"exit code {code}"


class _Cleanup:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def decode_untrusted(path: str | os.PathLike, max_voxels: int | None = None,
                     policy: SandboxPolicy | None = None, self_contained: bool = True):
    """Decode one input in a confined child under ``policy`` (the defaults when None).

    Args:
        path: a volume file, a DICOM zip or a DICOM folder.
        max_voxels: the most voxels accepted (serve.imaging.volume_io's default when None).
        policy: the sandbox limits.
        self_contained: see :meth:`SandboxedDecoder.decode`.

    Returns:
        The :class:`serve.imaging.volume_io.Volume`.
    """
    # lazy: the decoder child imports this package before confine(); the readers load only after it
    from serve.imaging.volume import DEFAULT_MAX_VOXELS

    return SandboxedDecoder(policy or SandboxPolicy()).decode(path, max_voxels or DEFAULT_MAX_VOXELS,
                                                              self_contained)

