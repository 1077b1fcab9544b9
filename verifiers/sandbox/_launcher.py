"""First code to run inside a sandbox; its source is passed to ``python -c``.

It reads a job from the control descriptor, drops to the sandbox uid (when the
sandbox asks it to), lowers its own resource limits, and then either replaces
itself with a command or runs trusted Python source (a test harness) in this
interpreter. Limits set here cannot be raised again by the untrusted code that
runs afterwards, because hard limits only go down for unprivileged processes.

The file must stay self-contained (standard library only, no package imports):
it runs under ``python -I -S`` from whatever path the sandbox gives it.
"""

import marshal
import os
import resource
import sys

_RLIMITS = {
    "cpu": resource.RLIMIT_CPU,
    "as": resource.RLIMIT_AS,
    "nproc": resource.RLIMIT_NPROC,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "core": resource.RLIMIT_CORE,
}


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _set_no_new_privs():
    # Without bubblewrap nothing else stops a setuid binary from regaining
    # privileges, so the flag is set here; ctypes is only imported on this path.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs = 38
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


def _drop_privileges(uid, gid):
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def main():
    control_fd, report_fd = int(sys.argv[1]), int(sys.argv[2])
    data = _read_all(control_fd)
    os.close(control_fd)
    # marshal rather than json: the spec comes from the trusted parent, and
    # importing json (and re with it) would double the start-up time.
    header_len = int.from_bytes(data[:8], "little")
    spec = marshal.loads(data[8 : 8 + header_len])
    payload = data[8 + header_len :]
    if spec.get("uid") is not None:
        _drop_privileges(spec["uid"], spec["gid"])
    if spec.get("no_new_privs"):
        _set_no_new_privs()
    for name, (soft, hard) in spec["rlimits"].items():
        resource.setrlimit(_RLIMITS[name], (soft, hard))
    os.umask(0o077)
    os.chdir(spec["cwd"])
    sys.path.extend(p.replace("{prefix}", sys.prefix) for p in spec.get("sys_path", ()))
    if spec.get("argv"):
        os.close(report_fd)
        argv = spec["argv"]
        if spec.get("self_exe"):
            argv[0] = sys.executable  # the interpreter as this process reached it (maybe via a descriptor)
        os.execvp(argv[0], argv)
    sys.argv = ["<sandboxed>"]
    namespace = {
        "__name__": "__main__",
        "__builtins__": __builtins__,
        "SANDBOX_PAYLOAD": payload,
        "SANDBOX_REPORT_FD": report_fd,
    }
    del data, spec["rlimits"]
    status = 0
    try:
        code = spec.get("code") or compile(spec["source"], "<harness>", "exec")
        exec(code, namespace)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        if exc.code is not None and not isinstance(exc.code, int):
            sys.stderr.write(f"{exc.code}\n")
    except BaseException:
        import traceback

        traceback.print_exc()
        status = 1
    # Skip interpreter finalisation (module teardown, GC): it is a large share
    # of a short run, and nothing sandboxed needs it.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status & 0xFF)


if __name__ == "__main__":
    main()
