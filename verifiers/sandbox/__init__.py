"""Isolated execution of untrusted programs: a local sandbox, or a code-execution service over HTTP.

* :class:`Sandbox` (``local.py``): bubblewrap namespaces, a seccomp filter,
  resource limits and a uid per run, runs forked from pre-started servers.
* :class:`RemoteSandbox` (``remote.py``): the same runs sent to a service
  speaking SandboxFusion's ``/run_code`` API; ``python -m verifiers.sandbox.server``
  (``server.py``) is such a service, running every request through a local
  :class:`Sandbox`.

The private modules hold the machinery: ``_isolation`` (host facts: bubblewrap,
uids, the file-system view), ``_fresh`` / ``_launcher`` (one interpreter per run),
``_servers`` / ``_serverpool`` / ``_forkserver`` (fork servers), ``_pump`` (pipes under limits),
``_seccomp``, ``_setup``, and, for the code verifier, ``_testplan`` and
``_valuecases`` (tests -> a job), and what runs inside the sandbox: ``_wire``
(values and calls between processes), ``_program`` (the program's process) and
``_harness`` (the tests and the records).
"""

from verifiers.sandbox import _isolation as iso
from verifiers.sandbox._isolation import ALL_LAYERS, LAYER_GAPS
from verifiers.sandbox._types import Limits, SandboxResult
from verifiers.sandbox.local import (
    Isolation,
    Sandbox,
    SandboxUnavailable,
    SandboxWarning,
    default_sandbox,
)
from verifiers.sandbox.remote import RemoteSandbox, ServiceUnavailable

__all__ = [
    "ALL_LAYERS",
    "LAYER_GAPS",
    "Isolation",
    "Limits",
    "RemoteSandbox",
    "Sandbox",
    "SandboxResult",
    "SandboxUnavailable",
    "SandboxWarning",
    "ServiceUnavailable",
    "default_sandbox",
    "iso",
]
