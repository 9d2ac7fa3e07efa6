"""Landlock: confine this process's file access to a few folders (Linux 5.13+, no privilege needed).

Landlock is a stackable LSM that an unprivileged process applies to itself; the
rules hold for the process and its future threads, and cannot be lifted. We
use its three system calls through ctypes (they have no wrapper in Python's
standard library): a ruleset handling every access right the running kernel's
ABI knows, one rule per allowed folder or file, then ``restrict_self``.

ABI 4 adds TCP bind/connect rights (all denied here), ABI 6 adds scopes (no
signals to, and no abstract UNIX sockets of, processes outside the domain).
Since ABI 1 a Landlock domain also forbids ptrace of processes outside it.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# Syscall numbers: 444-446 on every architecture with the generic table (x86_64, aarch64, ...).
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# Filesystem access rights (include/uapi/linux/landlock.h), and the ABI that introduced each.
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1

#: What a read-only rule allows: reading and executing files, listing folders.
READ_ONLY = EXECUTE | READ_FILE | READ_DIR
#: What a read-write rule allows: everything on plain files and folders, no devices, links, sockets or FIFOs.
READ_WRITE = READ_ONLY | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | TRUNCATE
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # the only rights a rule on a file may carry


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the kernel's header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def abi_version() -> int:
    """The Landlock ABI of the running kernel: 0 where Landlock is absent or disabled.

    Returns:
        The ABI version (1, 2, ...) from ``landlock_create_ruleset(NULL, 0, VERSION)``, or 0.
    """
    if platform.system() != "Linux":
        return 0
    r = _libc().syscall(ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0),
                        ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(r), 0)


@dataclass(frozen=True)
class Rule:
    """One allowed path and what may be done beneath it."""

    path: Path
    access: int


class LandlockError(OSError):
    """Landlock could not be applied (the caller decides whether that is fatal)."""


def restrict(rules: Iterable[Rule]) -> int:
    """Confine this process (all its threads) to ``rules``; every other file access is denied.

    Paths that do not exist are skipped. ``PR_SET_NO_NEW_PRIVS`` is set first, as
    Landlock requires without ``CAP_SYS_ADMIN``.

    Args:
        rules: the paths to allow and their access rights (:data:`READ_ONLY`, :data:`READ_WRITE`).

    Returns:
        The ABI version applied.

    Raises:
        LandlockError: Landlock is missing, or a system call failed.
    """
    abi = abi_version()
    if abi < 1:
        raise LandlockError("this kernel has no Landlock (Linux 5.13+ with landlock in the lsm= list)")
    libc = _libc()
    handled_fs = _FS_BY_ABI.get(abi, _FS_BY_ABI[5])
    attr = _RulesetAttr(handled_fs, (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0,
                        (_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL) if abi >= 6 else 0)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)  # the struct as this ABI knows it
    fd = libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size),
                      ctypes.c_uint32(0))
    if fd < 0:
        raise LandlockError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        for rule in rules:
            try:
                pfd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                access = rule.access & handled_fs
                if not os.path.isdir(rule.path):
                    access &= _FILE_RIGHTS
                beneath = _PathBeneathAttr(access, pfd)
                if libc.syscall(ctypes.c_long(_SYS_ADD_RULE), ctypes.c_int(fd), ctypes.c_int(_RULE_PATH_BENEATH),
                                ctypes.byref(beneath), ctypes.c_uint32(0)) != 0:
                    err = ctypes.get_errno()
                    raise LandlockError(err, f"landlock_add_rule({rule.path}): {os.strerror(err)}")
            finally:
                os.close(pfd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise LandlockError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.syscall(ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            err = ctypes.get_errno()
            raise LandlockError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(fd)
    return abi
