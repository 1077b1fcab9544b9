"""Hostile programs against the sandbox, with bubblewrap and in the process-limits fallback.

Every case checks three things: the verdict is a failure, the test process and
host are untouched (the test keeps running, nothing outside scratch changed,
no sandbox process is left), and the sandbox reports the layers it used.
Cases that only namespaces can contain are skipped in the fallback, with the
layer that is missing as the reason.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from verifiers import sandbox as sb
from verifiers.code import run_tests

MODES = ["bwrap", "rlimits"]
OK_TEST = "assert solve() == 42"


def _make(mode: str) -> sb.Sandbox:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.SandboxWarning)
        try:
            return sb.Sandbox(isolation=mode)
        except sb.SandboxUnavailable as exc:
            pytest.skip(f"bubblewrap unavailable here: {exc}")


@pytest.fixture(scope="module", params=MODES)
def box(request) -> sb.Sandbox:
    return _make(request.param)


def _need(box: sb.Sandbox, *layers: str) -> None:
    """Skip unless one of ``layers`` is active (each alone contains the case)."""
    if not any(layer in box.layers for layer in layers):
        pytest.skip(f"not containable without {' or '.join(layers)} (fallback mode)")


ROOT = os.geteuid() == 0
# What keeps a program away from the caller's processes and files: a uid of its
# own (as root), or namespaces. Unprivileged without bubblewrap, nothing does.
APART_FROM_CALLER = ("unprivileged_uid", "pid_namespace") if ROOT else ("pid_namespace",)
AWAY_FROM_FILES = ("unprivileged_uid", "readonly_fs") if ROOT else ("readonly_fs",)


def _procs_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry))
    return found


def _run(box, program, tests=OK_TEST, timeout_s=3.0, **kwargs):
    result = run_tests(program, tests, timeout_s=timeout_s, sandbox=box, **kwargs)
    assert not result.passed
    assert result.layers == box.layers
    return result


def test_trivial_program_passes_and_reports_layers(box):
    result = run_tests("def solve():\n    return 42\n", OK_TEST, sandbox=box)
    assert result.passed and result.pass_fraction == 1.0
    for layer in ("rlimits", "process_group_kill", "scratch_dir", "scrubbed_env", "output_cap"):
        assert layer in result.layers
    if box.uses_bwrap:
        assert {"no_network", "readonly_fs", "pid_namespace"} <= set(result.layers)
    else:
        assert "no_network" not in result.layers


def test_fork_bomb_is_contained(box):
    if ROOT:
        _need(box, "unprivileged_uid")  # RLIMIT_NPROC does not bind root
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = _run(box, program, timeout_s=2.0)
    assert time.monotonic() - start < 15
    assert result.verdicts[0].status in ("time_limit", "not_run", "runtime_error")
    # The host can still start processes.
    assert subprocess.run(["true"]).returncode == 0


def test_memory_bomb_is_contained(box):
    program = "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n"
    result = _run(box, program)
    assert result.verdicts[0].status in ("memory", "runtime_error")


def test_infinite_loop_gets_time_limit(box):
    result = _run(box, "def solve():\n    while True:\n        pass\n", timeout_s=1.0)
    assert result.verdicts[0].status == "time_limit"


def test_tight_c_loop_is_killed_by_the_wall_clock(box):
    # A single C call the harness's alarm cannot interrupt: only the group kill ends it.
    program = "def solve():\n    return sum(range(10**12))\n"
    start = time.monotonic()
    result = _run(box, program, timeout_s=1.0)
    assert result.verdicts[0].status == "time_limit"
    assert time.monotonic() - start < 10


def test_write_outside_scratch_is_refused(box, tmp_path):
    _need(box, *AWAY_FROM_FILES)
    target = tmp_path / "owned.txt"
    program = f"open({str(target)!r}, 'w').write('x')\ndef solve():\n    return 42\n"
    result = _run(box, program)
    assert result.verdicts[0].status == "runtime_error"
    assert not target.exists()


def test_write_to_world_writable_tmp_is_refused(box):
    _need(box, "readonly_fs")
    target = Path("/tmp") / f"ouroboros-sandbox-escape-{os.getpid()}"
    program = f"open({str(target)!r}, 'w').write('x')\ndef solve():\n    return 42\n"
    try:
        _run(box, program)
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_environment_secrets_are_not_visible(box, monkeypatch):
    _need(box, *APART_FROM_CALLER)
    monkeypatch.setenv("OUROBOROS_TEST_SECRET", "hunter2-secret")
    program = (
        "import os\n"
        "seen = ' '.join(os.environ.values())\n"
        "for pid in os.listdir('/proc'):\n"
        "    try:\n"
        "        seen += open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace')\n"
        "    except (OSError, ValueError):\n"
        "        pass\n"
        "print(seen)\n"
        "def solve():\n"
        "    return 42 if 'hunter2-secret' in seen else 0\n"
    )
    result = _run(box, program)
    assert result.verdicts[0].status == "wrong_answer"
    assert "hunter2" not in result.stdout


def test_sockets_cannot_reach_a_local_listener(box):
    _need(box, "no_network")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        program = (
            "import socket\n"
            "def solve():\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
            "    return 42\n"
        )
        result = _run(box, program)
        # A connection would sit in the backlog, accepted by the kernel.
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
    assert result.verdicts[0].status == "runtime_error"


def test_sockets_cannot_reach_outside(box):
    _need(box, "no_network")
    program = (
        "import socket\n"
        "def solve():\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
        "    return 42\n"
    )
    result = _run(box, program)
    assert result.verdicts[0].status == "runtime_error"


def test_killing_the_parent_and_everything_else_fails(box):
    _need(box, *APART_FROM_CALLER)
    me = os.getpid()
    program = (
        "import os, signal\n"
        f"for target in (os.getppid(), {me}, 1):\n"
        "    try:\n"
        "        os.kill(target, signal.SIGKILL)\n"
        "    except OSError:\n"
        "        pass\n"
        "os.kill(-1, signal.SIGKILL)\n"
    )
    _run(box, program)
    assert os.getpid() == me  # still alive to assert anything at all


def test_stdout_flood_is_capped(box):
    program = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    start = time.monotonic()
    result = _run(box, program, timeout_s=5.0)
    assert time.monotonic() - start < 5
    assert result.verdicts[0].status == "runtime_error"
    assert "output limit" in result.verdicts[0].detail
    raw = box.run_python(program, limits=sb.Limits(wall_s=5.0, output_bytes=10_000))
    assert raw.output_exceeded and not raw.timed_out and len(raw.stdout) == 10_000


def test_os_exit_before_tests_does_not_pass(box):
    result = _run(box, "import os\nos._exit(0)\n")
    assert result.verdicts[0].status == "not_run"


def test_sys_exit_before_tests_does_not_pass(box):
    result = _run(box, "import sys\nsys.exit(0)\n")
    assert result.verdicts[0].status == "runtime_error"


def test_forged_report_lines_are_ignored(box):
    program = (
        "import os\n"
        "line = b'0' * 32 + b' 0 passed \\n'\n"
        "print(line.decode())\n"
        "for fd in range(3, 20):\n"
        "    try:\n"
        "        os.write(fd, line)\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
    )
    result = _run(box, program)
    assert result.verdicts[0].status == "not_run"


def test_ctypes_and_posix_system_cannot_write_outside(box, tmp_path):
    _need(box, *AWAY_FROM_FILES)
    by_system, by_ctypes = tmp_path / "system.txt", tmp_path / "ctypes.txt"
    program = (
        "import ctypes, posix\n"
        f"posix.system('echo pwned > {by_system}')\n"
        f"ctypes.CDLL(None).system(b'echo pwned > {by_ctypes}')\n"
        "def solve():\n"
        f"    return 42 if open({str(by_system)!r}).read() else 0\n"
    )
    _run(box, program)
    assert not by_system.exists() and not by_ctypes.exists()


def test_escaped_daemon_is_killed_after_the_run(box):
    marker = f"{os.getpid() % 1000}.{time.monotonic_ns() % 10**6}"
    program = (
        "import os\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "    os._exit(0)\n"
        "import time\n"
        "time.sleep(0.3)\n"
    )
    _run(box, program)
    time.sleep(0.2)
    assert _procs_with(marker) == []


def test_scratch_directory_is_private_and_deleted(box):
    program = "import os\nopen('left-behind.txt', 'w').write('x')\n"
    tests = "import os\nassert False, os.getcwd() + ' ' + oct(os.stat('.').st_mode)"
    result = run_tests(program, tests, timeout_s=3.0, sandbox=box)
    verdict = result.verdicts[0]
    assert verdict.status == "wrong_answer"
    scratch, mode = verdict.detail.removeprefix("AssertionError: ").split()
    assert "ouroboros-sandbox-" in scratch
    assert int(mode, 8) & 0o077 == 0  # nobody else may enter it
    assert not Path(scratch).exists()


def test_file_size_limit(box):
    program = "open('big.bin', 'wb').write(b'x' * (64 * 2**20))\ndef solve():\n    return 42\n"
    result = _run(box, program)
    assert result.verdicts[0].status in ("runtime_error", "not_run")


def test_fallback_warns_and_names_the_layers_that_are_off():
    with pytest.warns(sb.SandboxWarning) as record:
        box = sb.Sandbox(isolation="rlimits")
    message = str(record[0].message)
    for layer in ("no_network", "readonly_fs", "pid_namespace"):
        assert f"{layer} OFF" in message
    assert "no_network" not in box.layers


def test_bwrap_mode_raises_when_bubblewrap_is_missing(monkeypatch):
    monkeypatch.setattr(sb.iso, "find_bwrap", lambda: None)
    with pytest.raises(sb.SandboxUnavailable):
        sb.Sandbox(isolation="bwrap")
    with pytest.warns(sb.SandboxWarning, match="not installed"):
        box = sb.Sandbox(isolation="auto")
    assert not box.uses_bwrap


def test_command_runs_with_stdin_and_limits(box):
    script = "read x; echo got $x; grep 'Max processes' /proc/self/limits"
    result = box.run(["sh", "-c", script], stdin=b"hello\n")
    lines = result.stdout.decode().split()
    assert result.ok and lines[:2] == ["got", "hello"]
    assert int(lines[4]) >= box.limits.max_processes  # soft limit, relative to the caller's uid


def test_sandbox_does_not_import_heavy_modules():
    code = "import sys, verifiers.sandbox, verifiers.code; print('sympy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("setpriv", [True, False])
def test_fallback_drops_privileges_with_or_without_setpriv(monkeypatch, setpriv):
    if not setpriv:
        monkeypatch.setattr(sb.iso, "find_setpriv", lambda: None)
    box = _make("rlimits")
    program = (
        "import os\n"
        "status = open('/proc/self/status').read()\n"
        "print(os.getuid(), os.getgroups(), status.split('NoNewPrivs:')[1].split()[0])\n"
    )
    uid, groups, no_new_privs = box.run_python(program).stdout.decode().split()
    assert no_new_privs == "1"
    if ROOT and "unprivileged_uid" in box.layers:
        assert int(uid) != 0 and groups == "[]"
