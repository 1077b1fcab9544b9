"""The verifier protocol, the registry and weighted combination.

A verifier is any callable ``(completion, example) -> Verdict``; a callable that
returns a plain number is accepted too and read as the score. Nothing here
imports sympy or starts processes, so ``import verifiers`` stays cheap; the
built-in verifiers are imported the first time they are looked up.

Example (a complete custom verifier):
    >>> from verifiers import Verdict, register
    >>> @register("exact")
    ... def exact(completion, example):
    ...     return float(completion.strip() == example["answer"])
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args, runtime_checkable

ErrorKind = Literal["timeout", "crashed", "invalid", "unavailable"]
ERROR_KINDS: tuple[str, ...] = get_args(ErrorKind)


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one completion.

    Attributes:
        score: the reward, usually in [0, 1].
        correct: whether the completion counts as right (for accuracy metrics).
        extracted: what was graded (the extracted answer or program), if anything.
        reason: why it failed, or a short note; empty when nothing needs saying.
        timed_out: a time limit cut verification short.
        info: extra per-verifier detail (component scores, pass fraction, ...).
        error: set when the score is not a judgement of the completion but a failure
            to judge it: ``"timeout"`` (a time limit cut it short; implied by
            ``timed_out``), ``"crashed"`` (the verifier raised or its process died),
            ``"invalid"`` (it returned something that is not a verdict), or
            ``"unavailable"`` (a service or process it needs is down). Such rows
            score 0; count them with :func:`verdict_metrics`.
    """

    score: float
    correct: bool
    extracted: Any = None
    reason: str = ""
    timed_out: bool = False
    info: Mapping[str, Any] = field(default_factory=dict)
    error: ErrorKind | None = None

    def __post_init__(self) -> None:
        if self.error is None and self.timed_out:
            object.__setattr__(self, "error", "timeout")
        elif self.error is not None and self.error not in ERROR_KINDS:
            raise ValueError(f"Verdict.error must be one of {ERROR_KINDS} or None, got {self.error!r}")

    @classmethod
    def fail(
        cls, reason: str, *, timed_out: bool = False, extracted: Any = None, error: ErrorKind | None = None
    ) -> Verdict:
        """A zero-score verdict carrying ``reason`` (and, for a failure to judge, its ``error`` kind)."""
        return cls(0.0, False, extracted=extracted, reason=reason, timed_out=timed_out, error=error)


@runtime_checkable
class Verifier(Protocol):
    """Anything called as ``verifier(completion, example)`` returning a Verdict or a number."""

    def __call__(self, completion: str, example: Mapping[str, Any], /) -> Verdict | float: ...


def to_verdict(value: Any) -> Verdict:
    """Read a verifier's return value as a Verdict.

    A number (or bool) becomes the score; ``correct`` is ``score >= 1`` so that
    0/1 and -1/+1 rewards both read naturally. NaN scores are rejected, since a
    NaN reward would poison every advantage in its group.
    """
    if isinstance(value, Verdict):
        return value
    if isinstance(value, numbers.Real):
        score = float(value)
        if math.isnan(score):
            raise ValueError("verifier returned NaN")
        return Verdict(score, score >= 1.0)
    raise TypeError(f"a verifier must return a Verdict or a number, got {type(value).__name__}")


def checked_verdict(value: Any) -> Verdict:
    """Read anything a verifier returned as a Verdict, never raising: what is not a
    valid verdict becomes a zero score with ``error="invalid"`` and the reason.

    Valid: a Verdict (or a real number) with a finite real score and a boolean
    ``correct``. NaN, inf, strings and other types are invalid (inf would count as
    correct, NaN would poison every advantage in its group, a string would fail later).
    """
    if isinstance(value, Verdict):
        score, correct = value.score, value.correct
    elif isinstance(value, numbers.Real):
        score, correct = value, None
    else:
        return Verdict.fail(f"invalid verdict: a {type(value).__name__}, not a Verdict or a number",
                            error="invalid")
    if not isinstance(score, numbers.Real):
        return Verdict.fail(f"invalid verdict: the score is a {type(score).__name__} ({score!r:.40}), "
                            "not a number", error="invalid")
    score = float(score)
    if math.isnan(score) or math.isinf(score):
        return Verdict.fail(f"invalid verdict: the score is {'NaN' if math.isnan(score) else score}",
                            error="invalid")
    if correct is None:
        return Verdict(score, score >= 1.0)
    integral = isinstance(correct, numbers.Integral) or type(correct).__name__ == "bool_"  # numpy's bool
    if not integral or correct not in (0, 1):
        return Verdict.fail(f"invalid verdict: correct is {correct!r:.40}, not a bool", error="invalid")
    if type(value.score) is float and type(correct) is bool:
        return value
    return dataclasses.replace(value, score=score, correct=bool(correct))


def run_verifier(verifier: Callable, completion: str, example: Mapping[str, Any]) -> Verdict:
    """Call ``verifier`` and normalise what it returns."""
    return to_verdict(verifier(completion, example))


def verdict_metrics(verdicts: Sequence[Any], prefix: str = "verifier/") -> dict[str, float]:
    """Counts a trainer logs per batch: failures to judge, by kind, and their rate.

    Returns ``{prefix + "timeouts": n, prefix + "errors": n, prefix + "error_rate": r}``
    where ``errors`` counts crashed, invalid and unavailable rows (timeouts apart,
    as a hostile completion causes them) and ``error_rate`` is every row with an
    ``error`` (timeouts included) over the batch size.
    """
    kinds = [getattr(v, "error", None) for v in verdicts]
    failed = [k for k in kinds if k is not None]
    return {
        f"{prefix}timeouts": float(sum(k == "timeout" for k in failed)),
        f"{prefix}errors": float(sum(k != "timeout" for k in failed)),
        f"{prefix}error_rate": len(failed) / len(kinds) if kinds else 0.0,
    }


# name -> "module:attribute", imported on first lookup so that sympy (math) is
# only paid for by processes that grade math.
_BUILTIN = {
    "math": "verifiers.math:verify",
    "math_any": "verifiers.math:verify_any",
    "code": "verifiers.code:verify",
    "code_partial": "verifiers.code:verify_partial",
    "format": "verifiers.format:verify",
    "countdown": "verifiers.countdown:verify",
    "math_verify": "verifiers.math.mathverify:verify",
}
_REGISTRY: dict[str, Callable] = {}
_LOCK = threading.Lock()


def register(name: str, verifier: Callable | None = None, *, overwrite: bool = False):
    """Register ``verifier`` under ``name``; usable as ``@register("name")``.

    Registering a built-in name or a taken one raises unless ``overwrite=True``.
    """

    def add(fn: Callable) -> Callable:
        if not callable(fn):
            raise TypeError(f"verifier {name!r} is not callable")
        with _LOCK:
            if not overwrite and (name in _REGISTRY or name in _BUILTIN):
                raise ValueError(f"a verifier named {name!r} is already registered")
            _REGISTRY[name] = fn
        return fn

    return add if verifier is None else add(verifier)


def get(name: str) -> Callable:
    """The verifier registered as ``name``, or the function ``name`` points to as ``"pkg.module:function"``.

    The second form imports the user's module here (and in each worker process),
    so a script or a ``--verifier.names pkg.module:function`` flag can name a
    verifier the script never imports.
    """
    with _LOCK:
        if name in _REGISTRY:
            return _REGISTRY[name]
        target = _BUILTIN.get(name)
    if target is None and ":" in name:
        return _import_target(name)
    if target is None:
        raise KeyError(
            f"no verifier named {name!r}; known: {', '.join(names())} (or give 'pkg.module:function')"
        )
    fn = _import_target(target)
    with _LOCK:
        return _REGISTRY.setdefault(name, fn)


def _import_target(target: str) -> Callable:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise KeyError(f"{target!r} is not of the form 'pkg.module:function'")
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import module {module_name!r} for verifier {target!r}: {exc}") from exc
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise KeyError(f"module {module_name!r} has no attribute {attribute!r} (verifier {target!r})")
        value = getattr(value, part)
    if not callable(value):
        raise TypeError(f"verifier {target!r} is a {type(value).__name__}, not a callable")
    return value


def names() -> list[str]:
    """All registered names, built-ins included."""
    with _LOCK:
        return sorted(set(_REGISTRY) | set(_BUILTIN))


VerifierSpec = str | Callable | Mapping[Any, float] | Sequence[tuple[Any, float]]


def resolve(spec: VerifierSpec) -> Callable:
    """A callable verifier from a name, a callable, or ``{name_or_callable: weight}``."""
    if isinstance(spec, str):
        return get(spec)
    if isinstance(spec, Mapping) or (isinstance(spec, Sequence) and not callable(spec)):
        return combine(spec)
    if callable(spec):
        return spec
    raise TypeError(f"cannot make a verifier from {spec!r}")


@dataclass(frozen=True)
class Weighted:
    """Weighted sum of verifiers; build it with :func:`combine`.

    ``score`` is the weighted sum of component scores. ``correct``,
    ``extracted`` come from the first component (by convention the correctness
    check; later ones shape the reward), ``timed_out`` and ``error`` from any,
    and ``info["scores"]`` holds every component's score.
    """

    components: tuple[tuple[str, Callable, float], ...]

    def __call__(self, completion: str, example: Mapping[str, Any]) -> Verdict:
        verdicts = [(label, run_verifier(fn, completion, example), w) for label, fn, w in self]
        first = verdicts[0][1]
        reasons = [f"{label}: {v.reason}" for label, v, _ in verdicts if v.reason]
        return Verdict(
            score=sum(w * v.score for _, v, w in verdicts),
            correct=first.correct,
            extracted=first.extracted,
            reason="; ".join(reasons),
            timed_out=any(v.timed_out for _, v, _ in verdicts),
            info={"scores": {label: v.score for label, v, _ in verdicts}},
            error=next((v.error for _, v, _ in verdicts if v.error is not None), None),
        )

    def __iter__(self):
        return iter(self.components)


def combine(weights: Mapping[Any, float] | Sequence[tuple[Any, float]]) -> Weighted:
    """Combine verifiers with weights, e.g. ``combine({"math": 1.0, "format": 0.1})``.

    Keys are registered names or callables; order is kept (the first is the primary).
    """
    items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
    if not items:
        raise ValueError("combine() needs at least one verifier")
    components = []
    for spec, weight in items:
        label = spec if isinstance(spec, str) else getattr(spec, "__name__", repr(spec))
        fn = get(spec) if isinstance(spec, str) else spec
        if not callable(fn):
            raise TypeError(f"{spec!r} is not a verifier")
        components.append((label, fn, float(weight)))
    return Weighted(tuple(components))


@dataclass(frozen=True)
class Routed:
    """Picks the verifier per example from ``example[key]`` (a registered name).

    For mixed batches, e.g. math and code prompts in one rollout.
    """

    key: str = "verifier"
    default: str | None = None

    def __call__(self, completion: str, example: Mapping[str, Any]) -> Verdict:
        name = example.get(self.key, self.default)
        if name is None:
            return Verdict.fail(f"example has no {self.key!r} naming its verifier")
        return run_verifier(get(name), completion, example)


def route(key: str = "verifier", default: str | None = None) -> Routed:
    """A verifier that dispatches on ``example[key]``; see :class:`Routed`."""
    return Routed(key, default)
