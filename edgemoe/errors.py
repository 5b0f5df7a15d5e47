"""Exceptions that carry a message meant for the user.

The CLI prints these as one line (``edgemoe: error: ...``) and exits non-zero; anything
else is a bug and keeps its traceback.
"""


class EdgeMoEError(Exception):
    """Base class for errors caused by bad input rather than by a bug."""


class ModelLoadError(EdgeMoEError):
    """A model directory, its config or its weights cannot be used."""


class StoreError(EdgeMoEError):
    """A converted expert store is missing, truncated, corrupted or inconsistent."""


class BudgetError(EdgeMoEError):
    """A memory budget cannot hold what the model needs."""


class InvalidArgument(EdgeMoEError, ValueError):
    """An option value is out of range (temperature < 0, top_p > 1, ...)."""


class ContextLengthError(InvalidArgument):
    """A prompt plus the tokens asked for do not fit the context size."""
