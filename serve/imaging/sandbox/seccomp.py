"""A seccomp filter for the decoder child: no network, no new processes, no reach into other processes.

Built with libseccomp (through ``pyseccomp``), which also handles the
architecture check: a system call made through another ABI of the same CPU
(i386 ``int 0x80`` or x32 on x86_64, a classic way around a filter) kills the
process. The filter is a deny list over a default of "allow": an allow list
would have to follow every system call numpy, nibabel, ITK and the C library
make, and break silently when one of them changes.

Denied, with EPERM (or ENOSYS for ``clone3``, so that the C library falls back
to ``clone``, whose flags a filter can read):

* sockets of any kind (the reply goes through a file, not a socket);
* new processes and programs: ``fork``, ``vfork``, ``execve``, ``clone``
  without ``CLONE_THREAD`` (threads stay allowed: ITK and BLAS use them);
* reaching other processes: ``ptrace``, ``process_vm_readv/writev``, ``kcmp``,
  ``pidfd_*``, signals to any process but itself, ``prlimit64``,
  ``setpriority`` and scheduler calls on another process;
* kernel surfaces that a decoder never needs and exploits often use:
  namespaces, mounts, ``bpf``, ``perf_event_open``, ``userfaultfd``,
  ``io_uring`` (its operations bypass seccomp), keyrings, module loading,
  ``open_by_handle_at``.

The filter sets ``PR_SET_NO_NEW_PRIVS`` (libseccomp's default), so no set-uid
program could regain what it takes away.
"""

from __future__ import annotations

import errno
import os

_CLONE_THREAD = 0x00010000

#: Denied outright.
DENIED: tuple[str, ...] = (
    # network
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    # new processes and programs
    "fork", "vfork", "execve", "execveat",
    # other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_open", "pidfd_getfd",
    "pidfd_send_signal", "tkill", "migrate_pages", "move_pages",
    # kernel surfaces
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount",
    "open_tree", "fsopen", "fsmount", "fsconfig", "fspick",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "init_module", "finit_module", "delete_module",
    "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "quotactl",
    "open_by_handle_at", "name_to_handle_at", "personality", "syslog", "vhangup",
)
#: Allowed only on this process: call -> (argument index, the one value allowed there). "pid" is this
#: process's id (signals: the C library's raise() sends to its own pid); 0 means "the caller" to the others.
SELF_ONLY: dict[str, tuple[int, int | str]] = {
    "kill": (0, "pid"), "tgkill": (0, "pid"), "rt_sigqueueinfo": (0, "pid"), "rt_tgsigqueueinfo": (0, "pid"),
    "prlimit64": (0, 0), "sched_setaffinity": (0, 0), "sched_setscheduler": (0, 0), "sched_setparam": (0, 0),
    "sched_setattr": (0, 0), "setpriority": (1, 0), "ioprio_set": (1, 0)}


def preload():
    """Import the binding, which looks libseccomp up with ``ldconfig -p`` (a new process).

    Returns:
        The ``pyseccomp`` module, or None where libseccomp is missing.
    """
    try:
        # lazy: pyseccomp loads libseccomp; only the sandbox child needs it, and may lack it
        import pyseccomp
    except (ImportError, RuntimeError):  # RuntimeError: pyseccomp found no libseccomp.so
        return None
    return pyseccomp


def install() -> None:
    """Load the filter into this process (every thread: TSYNC). Irreversible.

    Raises:
        OSError: libseccomp is missing or the kernel refused the filter.
    """
    sc = preload()
    if sc is None:
        raise OSError(errno.ENOSYS, "libseccomp is not available (install the libseccomp2 package)")

    f = sc.SyscallFilter(defaction=sc.ALLOW)
    f.set_attr(sc.Attr.CTL_TSYNC, 1)
    f.set_attr(sc.Attr.CTL_NNP, 1)
    deny = sc.ERRNO(errno.EPERM)
    for name in DENIED:
        _add(sc, f, deny, name)
    _add(sc, f, sc.ERRNO(errno.ENOSYS), "clone3")
    # clone: threads only (the C library's pthread_create sets CLONE_THREAD; fork and posix_spawn do not)
    _add(sc, f, deny, "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, 0))
    pid = os.getpid()
    for name, (arg, value) in SELF_ONLY.items():
        _add(sc, f, deny, name, sc.Arg(arg, sc.NE, pid if value == "pid" else value))
    f.load()


def _add(sc, f, action: int, name: str, *args) -> None:
    try:
        f.add_rule(action, name, *args)
    except (OSError, ValueError, RuntimeError):
        # A system call this architecture lacks (e.g. fork on aarch64, which only has clone): nothing to deny.
        pass
