"""The expert-store and offloaded-runtime tests share their fixtures through store.helpers."""

from store.helpers import one_thread  # noqa: F401  (autouse: importing it applies it to this package)
