"""Host-side reward functions for RL with verifiable rewards.

Importable without JAX (and without sympy until math is graded):

* :mod:`verifiers.base`: the :class:`Verdict`, the registry, weighted combination.
* :mod:`verifiers.pool`: a pool of worker processes with a wall-clock limit per call.
* :mod:`verifiers.math`: answer extraction and sympy equivalence.
* :mod:`verifiers.code`: programs and tests through :mod:`verifiers.sandbox`.
* :mod:`verifiers.format`, :mod:`verifiers.countdown`: small task verifiers.
* :func:`parse_python`: ``ast.parse`` that is safe to call from many threads at once
  (CPython 3.11's AST converter is not; use it in verifiers that read Python source).

Registered names: ``math``, ``math_any``, ``code``, ``code_partial``, ``format``,
``countdown``, plus whatever :func:`register` adds.
"""

from verifiers._pyast import parse as parse_python
from verifiers.base import (
    Routed,
    Verdict,
    Verifier,
    Weighted,
    combine,
    get,
    names,
    register,
    resolve,
    route,
    run_verifier,
    to_verdict,
)
from verifiers.pool import VerifierPool

__all__ = [
    "Routed",
    "Verdict",
    "Verifier",
    "VerifierPool",
    "Weighted",
    "combine",
    "get",
    "names",
    "parse_python",
    "register",
    "resolve",
    "route",
    "run_verifier",
    "to_verdict",
]
