"""Hostile programs against the sandbox, with bubblewrap and in the process-limits fallback,
each with runs forked from a pre-started fork server and with a fresh interpreter per run.

Every case checks three things: the verdict is a failure, the test process and
host are untouched (the test keeps running, nothing outside scratch changed,
no sandbox process is left), and the sandbox reports the layers it used.
Cases that only namespaces can contain are skipped in the fallback, with the
layer that is missing as the reason. The fork server also has to keep every
run from seeing anything an earlier run did, and survive or be replaced when
something kills it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from verifiers import sandbox as sb
from verifiers.code import run_tests

# The fork server is the default path; the fresh-interpreter path (the
# fallback, and fork_server=False) runs the same suite under -m slow.
MODES = [
    "bwrap-server",
    "rlimits-server",
    pytest.param("bwrap-fresh", marks=pytest.mark.slow),
    pytest.param("rlimits-fresh", marks=pytest.mark.slow),
]
OK_TEST = "assert solve() == 42"


def _make(mode: str, **kwargs) -> sb.Sandbox:
    isolation, _, start = mode.partition("-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.SandboxWarning)
        try:
            box = sb.Sandbox(isolation=isolation, fork_server=start != "fresh", **kwargs)
        except sb.SandboxUnavailable as exc:
            pytest.skip(f"bubblewrap unavailable here: {exc}")
    if start == "server" and not box.uses_fork_server:
        box.close()
        pytest.skip("no fork server here (needs bubblewrap or root)")
    return box


@pytest.fixture(scope="module", params=MODES)
def box(request):
    sandbox = _make(request.param)
    yield sandbox
    sandbox.close()


@pytest.fixture(scope="module", params=["bwrap-server", "rlimits-server"])
def server_box(request):
    sandbox = _make(request.param)
    yield sandbox
    sandbox.close()


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
        assert {"no_network", "readonly_fs", "pid_namespace", "syscall_filter"} <= set(result.layers)
    else:
        assert "no_network" not in result.layers and "syscall_filter" not in result.layers


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
    # A lower limit than the default keeps the time spent zeroing pages short on a loaded host.
    result = _run(box, program, memory_mb=256)
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
    # As on a host without bubblewrap: the switch that simulates one names itself in the warning instead.
    monkeypatch.delenv(sb.iso.BWRAP_ENV, raising=False)
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


def test_the_sandbox_interpreter_runs_as_a_command(box):
    """What code self-play does: ``Sandbox.run`` of the sandbox's own interpreter.

    Without bubblewrap, as root, each run has a uid of its own that cannot
    enter a private home directory holding the interpreter (/root/.pyenv); the
    sandbox then starts it the way it reaches it itself.
    """
    source = "import json; print(json.dumps([6 * 7]))"
    result = box.run([box.interpreter.executable, "-I", "-S", "-c", source])
    assert result.ok, result.stderr.decode()
    assert result.stdout == b"[42]\n"


def test_sandbox_does_not_import_heavy_modules():
    code = "import sys, verifiers.sandbox, verifiers.code; print('sympy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("mode", ["rlimits-server", "rlimits-fresh"])
@pytest.mark.parametrize("setpriv", [True, False])
def test_fallback_drops_privileges_with_or_without_setpriv(monkeypatch, setpriv, mode):
    if not setpriv:
        monkeypatch.setattr(sb.iso, "find_setpriv", lambda: None)
    box = _make(mode)
    program = (
        "import os\n"
        "status = open('/proc/self/status').read()\n"
        "print(os.getuid(), os.getgroups(), status.split('NoNewPrivs:')[1].split()[0])\n"
    )
    uid, groups, no_new_privs = box.run_python(program).stdout.decode().split()
    assert no_new_privs == "1"
    if ROOT and "unprivileged_uid" in box.layers:
        assert int(uid) != 0 and groups == "[]"


# ------------------------------------------------------------------ one run cannot reach the next

LEAVE_INTERPRETER_STATE = """
import builtins, json, os, signal, sys
builtins.LEAKED = 1
json.LEAKED = 1
sys.modules["leaked_module"] = type(sys)("leaked_module")
sys.path.append("/leaked")
sys.setrecursionlimit(123)
os.environ["LEAKED"] = "1"
os.putenv("LEAKED_C", "1")
os.umask(0)
signal.signal(signal.SIGUSR1, lambda *_: None)
open(os.path.join(os.environ["HOME"], "leak.txt"), "w").write("x")
if os.fork() == 0:
    os.setsid()
    os.execv("/bin/sleep", ["sleep", "{marker}"])
print(os.getcwd())
"""

PROBE_STATE = """
import sys
MODULES = sorted(sys.modules)
import builtins, ctypes, json, os, signal
libc = ctypes.CDLL(None, use_errno=True)
keyctl = {{"x86_64": 250, "aarch64": 219}}.get(__import__("platform").machine())
def proc_with(marker):
    for pid in os.listdir("/proc"):
        try:
            if marker in open(f"/proc/{{pid}}/cmdline", "rb").read():
                return True
        except OSError:
            pass
    return False
seen = {{
    "builtins": hasattr(builtins, "LEAKED"),
    "module": hasattr(json, "LEAKED"),
    "sys_modules": "leaked_module" in sys.modules,
    "sys_path": "/leaked" in sys.path,
    "recursion_limit": sys.getrecursionlimit() == 123,
    "environ": "LEAKED" in os.environ or "LEAKED_C" in os.environ,
    "umask": os.umask(0o077) == 0,
    "signal": signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL,
    "scratch": os.path.exists("{scratch}") or os.listdir(".") != [],
    "process": proc_with(b"{marker}"),
    "tmp": os.path.exists("/tmp/ouroboros-leak") or os.path.exists("/dev/shm/ouroboros-leak"),
    "sysv_shm": libc.shmget(0xB0B0, 0, 0) != -1,
    "mqueue": libc.mq_open(b"/ouroboros-leak", os.O_RDONLY) != -1,
    "keyring": bool(keyctl) and libc.syscall(keyctl, 10, -4, b"user", b"ouroboros-leak", 0) != -1,
}}
print(json.dumps({{"seen": seen, "modules": MODULES}}))
"""

LEAVE_KERNEL_STATE = """
import ctypes, json, os, platform
libc = ctypes.CDLL(None, use_errno=True)
add_key = {"x86_64": 248, "aarch64": 217}.get(platform.machine())
made = {
    "sysv_shm": libc.shmget(0xB0B0, 4096, 0o1666) != -1,
    "mqueue": libc.mq_open(b"/ouroboros-leak", os.O_CREAT | os.O_RDWR, 0o666, None) != -1,
    "keyring": bool(add_key) and libc.syscall(add_key, b"user", b"ouroboros-leak", b"x", 1, -4) != -1,
}
for path in ("/tmp/ouroboros-leak", "/dev/shm/ouroboros-leak"):
    try:
        open(path, "w").write("x")
        made[path] = True
    except OSError:
        made[path] = False
print(json.dumps(made))
"""


def _sleep_marker() -> str:
    """A duration for sleep(1) that no other process on the host has in its command line."""
    return f"{1000 + os.getpid() % 1000}.{time.monotonic_ns() % 10**9:09d}"


def _probe(box, marker="never-started", scratch="/nonexistent"):
    result = box.run_python(PROBE_STATE.format(marker=marker, scratch=scratch))
    assert result.ok, result.stderr.decode()
    return json.loads(result.stdout)


def test_consecutive_runs_share_no_interpreter_state(box):
    marker = _sleep_marker()
    baseline = _probe(box)
    started = box.servers_started
    leaver = box.run_python(LEAVE_INTERPRETER_STATE.format(marker=marker))
    assert leaver.ok, leaver.stderr.decode()
    after = _probe(box, marker, leaver.stdout.decode().strip())
    assert after["seen"] == dict.fromkeys(after["seen"], False)
    # Every run starts from the same interpreter state, whatever ran before it.
    assert after["modules"] == baseline["modules"]
    # With a fork server all three runs came from the same server: the
    # isolation is the fork's, not a restart's.
    assert box.servers_started == started
    assert _procs_with(marker) == []


def test_consecutive_runs_share_no_kernel_state(box):
    _need(box, "pid_namespace")  # System V IPC and message queues live in the IPC namespace
    leaver = box.run_python(LEAVE_KERNEL_STATE)
    assert leaver.ok, leaver.stderr.decode()
    made = json.loads(leaver.stdout)
    assert made["/tmp/ouroboros-leak"] is False and made["/dev/shm/ouroboros-leak"] is False
    if "syscall_filter" in box.layers and platform.machine() in ("x86_64", "aarch64"):
        assert made["keyring"] is False
    if box.uses_fork_server:
        assert made["mqueue"] is False  # RLIMIT_MSGQUEUE is 0 in a server's runs
    seen = _probe(box)["seen"]
    assert seen == dict.fromkeys(seen, False)


# ------------------------------------------------------------------ the fork server's own life


def _busy(box) -> list:
    idle = set(map(id, box._servers._idle))
    return [server for server in box._servers.live() if id(server) not in idle]


def _wait_gone(pids, timeout=10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    return alive


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_run_cannot_kill_its_server(server_box):
    server_box.run_python("pass")
    started = server_box.servers_started
    program = (
        "import os, signal\n"
        "for target in (os.getppid(), 1):\n"
        "    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):\n"
        "        try:\n"
        "            os.kill(target, sig)\n"
        "        except OSError:\n"
        "            pass\n"
        "os.kill(-1, signal.SIGKILL)\n"
    )
    server_box.run_python(program)
    assert server_box.run_python("print(6 * 7)").stdout == b"42\n"
    assert server_box.servers_started == started


def test_timeout_and_output_cap_keep_the_server(server_box):
    server_box.run_python("pass")
    started = server_box.servers_started
    result = server_box.run_python("while True:\n    pass\n", limits=sb.Limits(wall_s=0.5))
    assert result.timed_out and result.returncode == -signal.SIGKILL
    result = server_box.run_python(
        "while True:\n    print('x' * 4096)\n", limits=sb.Limits(output_bytes=8192)
    )
    assert result.output_exceeded and len(result.stdout) == 8192
    assert server_box.run_python("print(6 * 7)").stdout == b"42\n"
    assert server_box.servers_started == started


def test_dead_idle_server_is_replaced(server_box):
    server_box.run_python("pass")
    started = server_box.servers_started
    victims = server_box._servers.live()
    for server in victims:
        os.kill(server.pid, signal.SIGKILL)
    assert _wait_gone([server.pid for server in victims]) == []
    assert server_box.run_python("print(6 * 7)").stdout == b"42\n"
    assert server_box.servers_started == started + 1


def test_server_killed_mid_run_fails_only_that_run(server_box):
    marker = _sleep_marker()
    program = f"import os\nos.execv('/bin/sleep', ['sleep', '{marker}'])\n"
    outcome = {}
    runner = threading.Thread(
        target=lambda: outcome.update(r=server_box.run_python(program, limits=sb.Limits(wall_s=30)))
    )
    runner.start()
    deadline = time.monotonic() + 10
    while not _procs_with(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    (server,) = _busy(server_box)
    started = time.monotonic()
    os.kill(server.pid, signal.SIGKILL)
    runner.join(15)
    result = outcome["r"]
    assert not result.ok and not result.timed_out and result.returncode is None
    assert time.monotonic() - started < 5
    assert _wait_gone(_procs_with(marker)) == []  # the run went down with its server
    assert server_box.run_python("print(6 * 7)").stdout == b"42\n"


def test_concurrent_runs_get_a_server_each(server_box):
    started = server_box.servers_started
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: server_box.run_python(f"print({i} * 2)"), range(16)))
    assert [r.stdout for r in results] == [f"{i * 2}\n".encode() for i in range(16)]
    assert server_box.servers_started - started <= 4


def test_forked_caller_starts_its_own_server(server_box):
    server_box.run_python("pass")
    started, servers = server_box.servers_started, {s.pid for s in server_box._servers.live()}
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            result = server_box.run_python("print(6 * 7)")
            os.write(write_end, f"{result.stdout.decode().strip()} {server_box.servers_started}".encode())
            server_box.close()  # the child's own server; the parent's are not in its pool
        finally:
            os._exit(0)
    os.close(write_end)
    reply = os.read(read_end, 100).decode().split()
    os.close(read_end)
    os.waitpid(child, 0)
    assert reply == ["42", str(started + 1)]
    # The parent's servers were left alone and keep serving it.
    assert server_box.run_python("print(1)").ok
    assert {s.pid for s in server_box._servers.live()} == servers and server_box.servers_started == started


def test_servers_exit_with_their_host():
    host = (
        "import os, sys, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "from verifiers import sandbox as sb\n"
        "box = sb.Sandbox()\n"
        "assert box.run_python('print(1)').ok\n"
        "servers = box._servers.live()\n"
        "print(*[s.scratch_root for s in servers], box._setup.trash.path)\n"
        "print(*[p for s in servers for p in {s.pid, s.proc.pid}], flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    out = subprocess.run([sys.executable, "-c", host], capture_output=True, text=True, timeout=60)
    directories, pids = out.stdout.splitlines()
    for directory in directories.split():  # killed, the host could not remove them itself
        shutil.rmtree(directory, ignore_errors=True)
    assert pids, out.stderr
    assert _wait_gone(int(pid) for pid in pids.split()) == []


def test_server_whose_scratch_root_was_removed_is_replaced(server_box):
    server_box.run_python("pass")
    started = server_box.servers_started
    for server in server_box._servers.live():
        shutil.rmtree(server.scratch_root)
    assert server_box.run_python("print(6 * 7)").stdout == b"42\n"
    assert server_box.servers_started == started + 1


SHARED_UID_CHECK = """
import json, os, sys, warnings
sys.path.insert(0, {repo!r})
warnings.simplefilter("ignore")
from verifiers import sandbox as sb
box = sb.Sandbox(isolation="bwrap")
report = {{"server": box.uses_fork_server, "layers": list(box.layers)}}
box.run_python("import os, signal\\nfor t in (1, os.getppid()):\\n    os.kill(t, 9)\\nos.kill(-1, 9)")
report["survived_kill"] = box.servers_started == 1
peek = "try:\\n    open('/proc/1/mem', 'rb')\\n    print('read')\\nexcept OSError:\\n    print('refused')"
report["proc_mem"] = box.run_python(peek).stdout.decode().strip()
box.run_python("import resource\\nresource.prlimit(1, resource.RLIMIT_NOFILE, (40, 40))")
limits = box.run_python("import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
report["nofile_after_prlimit"] = int(limits.stdout)
box.run_python("open('/dev/shm/leak', 'w').write('x')")
if os.uname().machine == "x86_64":
    ioprio = "import ctypes; print(ctypes.CDLL(None).syscall(252, 1, 0))"  # ioprio_get
    report["ioprio_before"] = box.run_python(ioprio).stdout.decode().strip()
    box.run_python("import ctypes; ctypes.CDLL(None).syscall(251, 1, 1, 3 << 13)")  # idle class, pid 1
    report["ioprio_after"] = box.run_python(ioprio).stdout.decode().strip()
report["dev_shm_after"] = box.run_python("import os; print(os.listdir('/dev/shm'))").stdout.decode().strip()
report["servers_started"] = box.servers_started
print(json.dumps(report))
"""


def test_server_guards_itself_when_runs_share_its_uid():
    """Unprivileged, runs share the server's uid: it must be out of their reach or be replaced."""
    system_python = "/usr/bin/python3"
    if not ROOT or not os.path.exists(system_python) or sb.iso.find_bwrap() is None:
        pytest.skip("needs root (to become nobody), a system Python and bubblewrap")
    repo = str(Path(sb.__file__).resolve().parents[2])
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    command = [*nobody, system_python, "-I", "-c", SHARED_UID_CHECK.format(repo=repo)]
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd="/", env={"PATH": "/usr/bin:/bin"}
    )
    if out.returncode != 0 and "Permission denied" in out.stderr:
        pytest.skip(f"the repository is not readable as nobody: {out.stderr[-200:]}")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["server"] and "unprivileged_uid" not in report["layers"]
    assert report["survived_kill"] and report["proc_mem"] == "refused"
    # A run that lowered the server's limit or left a file in /dev/shm spent
    # that server: the next run came from a new one, with neither.
    assert report["nofile_after_prlimit"] == sb.Limits().open_files
    assert report["dev_shm_after"] == "[]"
    if platform.machine() == "x86_64":
        assert report["ioprio_before"] == report["ioprio_after"]
    assert report["servers_started"] == (4 if platform.machine() == "x86_64" else 3)
