"""Exceptions of the runtime.

Every error a user can cause (bad engine directory, tampered artifact, wrong input array, missing
backend) is a ``DeployError`` whose message is ONE line naming the file/field/argument at fault and
what was expected, so the CLI can print it as ``Error: ...`` without a traceback.
"""
from __future__ import annotations

__all__ = ["DeployError", "SpecError", "InputError", "BackendUnavailable", "NonFiniteOutput"]


class DeployError(RuntimeError):
    """Base class: a one-line, user-facing error of the deployment runtime."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever the cause contained (paths, nested errors).
        super().__init__(" ".join(str(message).split()))


class SpecError(DeployError):
    """``stlm.json`` (or the engine directory around it) does not follow the engine format."""


class InputError(DeployError):
    """An image/batch given to the runtime is not what the engine accepts."""


class BackendUnavailable(DeployError):
    """A backend cannot run here (package missing, no GPU, provider fell back, plan mismatch).

    ``backend="auto"`` skips a candidate that raises this and tries the next one; integrity errors
    (checksums, invalid spec) are plain ``DeployError``/``SpecError`` and are never skipped.
    """


class NonFiniteOutput(DeployError):
    """A backend returned NaN or +-Infinity (e.g. an fp16 overflow): the result is refused, never reported
    as a score. A NaN score compares False with every threshold, i.e. it would read as a silent "normal".
    The message names the engine, the artifact, the backend and the precision."""
