"""A hostile decoder child for the sandbox denial tests: it confines itself exactly as
serve.imaging.sandbox.child does, then tries one attack and reports what happened as a refusal.

Run by the real runner: ``python -I attack_child.py ATTACK REQUEST``. An attack that
succeeds reports "succeeded" (the tests fail on it); one the sandbox stops reports
"denied: <why>"; one the limits kill never reports (the runner answers 422).
"""

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from serve.imaging.sandbox import reply
from serve.imaging.sandbox.child import EXIT_REFUSED, confine


def attempt(fn) -> str:
    try:
        result = fn()
    except OSError as e:
        return f"denied: {type(e).__name__} errno {e.errno}"
    return f"succeeded: {str(result)[:200]}"


def _libc_call(name: str, *args) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    r = getattr(libc, name)(*args)
    if r == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def main() -> int:
    attack, request = sys.argv[1], json.loads(sys.argv[2])
    target = request["input"]  # the tests put the attack's target where a real input would be named
    out = Path(request["workdir"]) / "out"
    layers = confine(request["policy"], [], [request["workdir"]])
    ppid = os.getppid()
    attacks = {
        "read_file": lambda: attempt(lambda: Path(target).read_bytes()),
        "parent_environ": lambda: attempt(lambda: Path(f"/proc/{ppid}/environ").read_bytes()),
        "socket_inet": lambda: attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
        "socket_unix": lambda: attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)),
        "ptrace_parent": lambda: attempt(lambda: _libc_call("ptrace", ctypes.c_long(16), ctypes.c_long(ppid),
                                                            None, None)),  # PTRACE_ATTACH
        "kill_parent": lambda: attempt(lambda: os.kill(ppid, signal.SIGKILL)),
        "fork": lambda: attempt(lambda: os.fork() or os._exit(0)),
        "exec": lambda: attempt(lambda: subprocess.run(["/bin/true"], check=True)),
        "environment": lambda: ("succeeded: " + ",".join(os.environ)) if any(
            target in v for v in os.environ.values()) else "denied: not in the environment",
        "memory": lambda: attempt(lambda: len(bytearray(int(request["policy"]["memory_bytes"])))),
        "cpu": lambda: attempt(lambda: [None for _ in iter(int, 1)]),
        "output": lambda: attempt(lambda: (out / "big").write_bytes(b"\0" * (request["policy"]["file_bytes"] + 1))),
        "crash": lambda: attempt(lambda: ctypes.string_at(0)),
    }
    outcome = attacks[attack]()
    reply.write_error(out, 422, "attack", json.dumps({"attack": attack, "outcome": outcome, "layers": layers}))
    return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
