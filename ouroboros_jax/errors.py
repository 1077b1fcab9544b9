"""The errors that checkpoint files raise, shared by the orbax layer and the HF import.

Importable without JAX, orbax or numpy, so that `models/` and `checkpoint.py` raise
the same classes without importing each other.
"""

from __future__ import annotations


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint (Hugging Face files or an orbax step) is missing, corrupt or does not fit.

    The message names the file or step and, where there is one, the tensor or leaf.
    Both a ValueError (bad input data) and a RuntimeError (a failed save or restore),
    so that code catching either of the two classes it was once raised as still does.
    """


class NonFiniteError(FloatingPointError):
    """A tree holds NaN or inf; the message names the step and the first such leaf."""
