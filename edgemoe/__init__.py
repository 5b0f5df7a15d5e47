"""edgemoe: run Mixture-of-Experts LLMs on devices whose memory is smaller than the model."""

__version__ = "0.1.0"


def load(path=None, **kwargs):
    """Load a model for generation; see `edgemoe.api.load`."""
    from .api import load as _load

    return _load(path, **kwargs)
