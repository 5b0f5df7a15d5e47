"""The offloaded runtime: expert cache (cache.py), eviction policies (policies.py),
routing traces (trace.py), the expert provider (offload.py) and `load_converted`
(engine.py)."""
