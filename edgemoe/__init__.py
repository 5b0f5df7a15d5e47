"""edgemoe: run Mixture-of-Experts LLMs on devices whose memory is smaller than the model."""

from ._version import __version__  # noqa: F401 - the version lives in _version.py


def load(path=None, **options):
    # Lazy: every `import edgemoe.X` runs this file first, so it must not pull in torch
    # and the engine (that would slow `edgemoe --help` and tie every module to api's).
    from .api import load as _load

    return _load(path, **options)


def _doc() -> str:
    from .runtime.config import load_doc  # no torch: help(edgemoe.load) lists every option

    return load_doc()


load.__doc__ = _doc()
