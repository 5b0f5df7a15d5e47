"""The package version: a leaf that imports nothing, so any module (and pyproject.toml,
which reads it statically) can take the version without importing edgemoe's other code."""

__version__ = "0.1.0"
