"""Host-side reward functions for RL with verifiable rewards.

Importable without JAX (and without sympy: math is graded in its own process):

* :mod:`verifiers.base`: the :class:`Verdict`, the registry, weighted combination.
* :mod:`verifiers.pool`: a pool of worker processes with a wall-clock limit per call.
* :mod:`verifiers.math`: answer extraction and sympy equivalence, under a hard limit.
* :mod:`verifiers.code`: programs and tests through :mod:`verifiers.sandbox`.
* :mod:`verifiers.format`, :mod:`verifiers.countdown`: small task verifiers.
* :func:`parse_python`: ``ast.parse`` that is safe to call from many threads at once
  (CPython 3.11's AST converter is not; use it in verifiers that read Python source).

Registered names: ``math``, ``math_any``, ``math_verify`` (the ``math-verify``
package), ``code``, ``code_partial``, ``format``, ``countdown``, plus whatever
:func:`register` adds; ``"pkg.module:function"`` names any importable function.
"""

from verifiers._pyast import parse as parse_python
from verifiers.base import (
    ERROR_KINDS,
    ErrorKind,
    Routed,
    Verdict,
    Verifier,
    Weighted,
    checked_verdict,
    combine,
    get,
    names,
    register,
    resolve,
    route,
    run_verifier,
    to_verdict,
    verdict_metrics,
)
from verifiers.pool import VerifierPool

__all__ = [
    "ERROR_KINDS",
    "ErrorKind",
    "Routed",
    "Verdict",
    "Verifier",
    "VerifierPool",
    "Weighted",
    "checked_verdict",
    "combine",
    "get",
    "names",
    "parse_python",
    "register",
    "resolve",
    "route",
    "run_verifier",
    "to_verdict",
    "verdict_metrics",
]
