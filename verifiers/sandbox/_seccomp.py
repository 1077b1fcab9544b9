"""The seccomp filter bubblewrap installs in the sandbox (``bwrap --seccomp FD``).

A short classic-BPF program refuses, with EPERM, the system calls that keep
state in the kernel beyond the life of a process (the keyrings: a key added
to the user keyring would be readable by the next run under the same uid) or
that only widen the kernel's attack surface for a test program (bpf,
perf_event_open, userfaultfd, io_uring). Calls through another ABI than the
native one (i386 ``int 0x80`` or x32 on x86-64) are refused outright, since a
filter on native numbers would not see them. Everything else is allowed.
"""

from __future__ import annotations

import errno
import os
import platform
import struct

# (audit arch, numbers of: add_key, request_key, keyctl, bpf, perf_event_open,
#  userfaultfd, io_uring_setup, io_uring_enter, io_uring_register)
_ARCHES = {
    "x86_64": (0xC000003E, (248, 249, 250, 321, 298, 323, 425, 426, 427)),
    "aarch64": (0xC00000B7, (217, 218, 219, 280, 241, 282, 425, 426, 427)),
}
_X32_BIT = 0x40000000

_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
_NR_OFFSET, _ARCH_OFFSET = 0, 4  # fields of struct seccomp_data


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def filter_program(machine: str | None = None) -> bytes | None:
    """The filter as an array of ``struct sock_filter``; None on an architecture without a table."""
    arch = _ARCHES.get(machine or platform.machine())
    if arch is None:
        return None
    audit_arch, numbers = arch
    deny = _insn(_RET_K, 0, 0, _ERRNO | errno.EPERM)
    body = [_insn(_LD_W_ABS, 0, 0, _ARCH_OFFSET), _insn(_JEQ_K, 1, 0, audit_arch)]
    body += [_insn(_RET_K, 0, 0, _ERRNO | errno.ENOSYS), _insn(_LD_W_ABS, 0, 0, _NR_OFFSET)]
    checks = ([(_JGE_K, _X32_BIT)] if audit_arch == _ARCHES["x86_64"][0] else []) + [
        (_JEQ_K, nr) for nr in numbers
    ]
    for i, (code, k) in enumerate(checks):
        # Jump over the remaining checks and the allow to reach the deny.
        body.append(_insn(code, len(checks) - i, 0, k))
    body += [_insn(_RET_K, 0, 0, _ALLOW), deny]
    return b"".join(body)


def filter_fd(program: bytes) -> int:
    """A readable descriptor holding ``program`` (bubblewrap reads it to the end); close it after use."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, program)
    finally:
        os.close(write_end)
    return read_end
