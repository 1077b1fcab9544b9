"""Run-directory paths that may be URLs: joined and opened without losing their "//".

`pathlib.Path("gs://bucket/run")` is the local relative path "gs:/bucket/run": a
run told to write to a bucket would quietly write to the local disk. Paths here stay
strings until they are opened, and are opened through `etils.epath` (what orbax uses),
which reads and writes local files and gs://, s3://, az:// and hf:// URLs alike.

    run_dir = cfg.logging.run_dir                       # "gs://bucket/run" or "runs/x"
    ckpt_dir = paths.join(run_dir, "checkpoints")      # "gs://bucket/run/checkpoints"
    paths.as_path(run_dir).mkdir(parents=True, exist_ok=True)
    paths.as_path(paths.join(run_dir, "config.json")).write_text(...)
"""

from __future__ import annotations

import os
import posixpath
import re

from etils import epath

__all__ = ["REMOTE_SCHEMES", "as_path", "check", "is_remote", "join"]

# The URL schemes epath (and so orbax) can open; the rest have no backend here.
REMOTE_SCHEMES = ("gs", "s3", "az", "hf")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# "gs:/bucket": a URL whose "//" a pathlib.Path collapsed.
_COLLAPSED = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)")


def check(path: str | os.PathLike[str]) -> str:
    """`path` as a string, refusing URLs that cannot be opened or were mangled.

    Args:
        path: a local path or a URL string.

    Returns:
        The path, unchanged, as a string.

    Raises:
        ValueError: a URL of a scheme with no backend, or one that lost a "/" of its
            "//" (what `pathlib.Path` does to "gs://..."): it would be a local directory.
    """
    text = os.fspath(path)
    url = _URL.match(text)
    if url and url.group(1) not in REMOTE_SCHEMES:
        raise ValueError(f"{text}: unsupported URL scheme {url.group(1)!r}; remote run directories "
                         f"may use {', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    collapsed = _COLLAPSED.match(text)
    if collapsed and collapsed.group(1) in REMOTE_SCHEMES:
        fixed = text.replace(":/", "://", 1)
        raise ValueError(f"{text}: looks like the URL {fixed} with its '//' collapsed (pathlib.Path "
                         "does that); pass the URL as a string, and join parts with "
                         "ouroboros_jax.paths.join")
    return text


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a URL (gs://..., s3://...) rather than a local path."""
    return _URL.match(os.fspath(path)) is not None


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """`base` joined with `parts`; URLs keep their "//" ("gs://b/run" + "ckpt" -> "gs://b/run/ckpt").

    Raises:
        ValueError: as `check`, for `base`.
    """
    base = check(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def as_path(path: str | os.PathLike[str]) -> epath.Path:
    """An `epath.Path` for reading and writing `path`, local or remote.

    Raises:
        ValueError: as `check`.
    """
    return epath.Path(check(path))
