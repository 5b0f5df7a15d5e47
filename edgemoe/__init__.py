"""edgemoe: run Mixture-of-Experts LLMs on devices whose memory is smaller than the model."""

from ._version import __version__  # noqa: F401 - the version lives in _version.py


def load(path=None, **kwargs):
    """Load a model for generation; see `edgemoe.api.load`."""
    # Lazy: every `import edgemoe.X` runs this file first, so it must not pull in torch
    # and the engine (that would slow `edgemoe --help` and tie every module to api's).
    from .api import load as _load

    return _load(path, **kwargs)
