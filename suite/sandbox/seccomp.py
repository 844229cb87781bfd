"""A seccomp-BPF system-call filter for the sandbox worker (Linux, x86_64 and aarch64).

Installed by :mod:`suite.sandbox.worker` on all of its threads (``SECCOMP_FILTER_FLAG_TSYNC``)
after the suite's own imports and before any submitted code is imported, and irrevocable from
then on (``PR_SET_NO_NEW_PRIVS``; a filter can only be added, never removed). It denies, with
``EPERM`` (so the measure sees an ``OSError`` and the engine names it):

- new processes: ``fork``, ``vfork``, ``clone`` without ``CLONE_THREAD`` (threads are allowed:
  numpy and torch start them), ``execve``, ``execveat``;
- sockets: ``socket`` (the sandbox has no network either), and ``io_uring_setup``, which
  could perform I/O outside this filter's view;
- ``ptrace``, ``process_vm_writev``, ``mount``, ``unshare``, ``setns``, ``bpf``.

``clone3`` answers ``ENOSYS``, so glibc creates threads with ``clone``, whose flags the filter
can read (``clone3`` passes them in memory, out of a filter's reach). Calls of another
architecture's ABI (x32 on x86_64) are refused too.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

# BPF instruction classes and modes (linux/filter.h, linux/bpf_common.h)
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
CLONE_THREAD = 0x00010000
X32_SYSCALL_BIT = 0x40000000
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1

ARCHES: dict[str, dict[str, int]] = {
    "x86_64": {"audit_arch": 0xC000003E, "seccomp": 317, "clone": 56, "clone3": 435,
               "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "socket": 41,
               "io_uring_setup": 425, "ptrace": 101, "process_vm_writev": 311, "mount": 165,
               "unshare": 272, "setns": 308, "bpf": 321},
    "aarch64": {"audit_arch": 0xC00000B7, "seccomp": 277, "clone": 220, "clone3": 435,
                "execve": 221, "execveat": 281, "socket": 198, "io_uring_setup": 425,
                "ptrace": 117, "process_vm_writev": 271, "mount": 40, "unshare": 97,
                "setns": 268, "bpf": 280},
}
DENIED = ("fork", "vfork", "execve", "execveat", "socket", "io_uring_setup", "ptrace",
          "process_vm_writev", "mount", "unshare", "setns", "bpf")


class SeccompError(OSError):
    """The filter could not be installed (an unknown architecture, or a kernel without it)."""


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def build_filter(machine: str | None = None) -> bytes:
    """The filter program for ``machine`` (default: this one) as ``struct sock_filter``s."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        raise SeccompError(f"no system-call filter for architecture {machine!r}; supported: "
                           f"{', '.join(ARCHES)}")
    table = ARCHES[machine]
    deny = RET_ERRNO | errno.EPERM
    body: list[tuple[int, int, int, int]] = []  # (code, jt, jf, k) with jumps relative
    # [0] arch check: load arch, kill the process on another ABI's number space
    body.append((_LD_W_ABS, 0, 0, 4))
    body.append((_JEQ_K, 1, 0, table["audit_arch"]))
    body.append((_RET_K, 0, 0, RET_KILL_PROCESS))
    body.append((_LD_W_ABS, 0, 0, 0))  # the system call number
    if machine == "x86_64":  # x32 ABI calls carry this bit: refuse them all
        body.append((_JGE_K, 0, 1, X32_SYSCALL_BIT))
        body.append((_RET_K, 0, 0, deny))
    body.append((_JEQ_K, 0, 1, table["clone3"]))
    body.append((_RET_K, 0, 0, RET_ERRNO | errno.ENOSYS))
    for name in DENIED:
        if name in table:
            body.append((_JEQ_K, 0, 1, table[name]))
            body.append((_RET_K, 0, 0, deny))
    body.append((_JEQ_K, 1, 0, table["clone"]))
    body.append((_RET_K, 0, 0, RET_ALLOW))
    # clone: flags are the first argument (args[0] at offset 16, low 32 bits first)
    body.append((_LD_W_ABS, 0, 0, 16))
    body.append((_JSET_K, 0, 1, CLONE_THREAD))
    body.append((_RET_K, 0, 0, RET_ALLOW))
    body.append((_RET_K, 0, 0, deny))
    return b"".join(_insn(*item) for item in body)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> None:
    """Install :func:`build_filter` on every thread of this process; raises
    :class:`SeccompError` when the kernel refuses."""
    machine = platform.machine()
    program = build_filter(machine)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SeccompError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: "
                           f"{errno.errorcode.get(ctypes.get_errno(), '?')}")
    buffer = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    result = libc.syscall(ARCHES[machine]["seccomp"], SECCOMP_SET_MODE_FILTER,
                          SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(prog))
    if result != 0:
        raise SeccompError(f"seccomp(SECCOMP_SET_MODE_FILTER) failed: "
                           f"{errno.errorcode.get(ctypes.get_errno(), '?')} (result {result})")
