"""`ast.parse` behind one process-wide lock.

CPython 3.11 can raise ``SystemError: AST constructor recursion depth
mismatch`` when two threads build AST objects at once (python/cpython
gh-106905): the depth counter the converter checks is shared state. Grading
from a thread pool (several `run_tests` calls at once) hit it. Parsing is
microseconds against a sandboxed run's milliseconds, so serialising it costs
nothing measurable.
"""

from __future__ import annotations

import ast
import threading

_LOCK = threading.Lock()


def parse(source: str, mode: str = "exec") -> ast.AST:
    """`ast.parse(source, mode=mode)`, one thread at a time."""
    with _LOCK:
        return ast.parse(source, mode=mode)
