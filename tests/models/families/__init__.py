"""One test module per model family added after the first four: each defines CONFIGS
(name -> a function returning a tiny transformers config built with the family's own
config class) and its hand-written tests (routing computed by hand, sanitize rules).
tests/models/test_family_parity.py runs the shared parity and offload checks on every
config found here."""
