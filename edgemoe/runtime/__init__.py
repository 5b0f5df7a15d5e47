"""The offloaded runtime: everything between an MoE block asking for experts and the
bytes on storage.

- cache.py: the byte-budgeted expert cache; its public operations are the only way in
  (slab.py: the preallocated slab and its allocator; loader.py: background reads).
- offload.py: the expert provider MoE blocks call; prefetch.py: preloading settings and
  pacing; predict.py: online predictors (fit.py, predictor_stats.py: offline fitting and
  the statistics file); policies.py: eviction policies.
- trace.py: routing traces and the one routing recorder; simulate.py: trace replay.
- loading.py: `load_converted` and the memory plan (what the budget holds).
- config.py: `RuntimeConfig`, every option of edgemoe.load checked in one place;
  stats.py: the typed statistics of the cache and the provider (JSON via to_dict).

Owns no model code and parses no checkpoint: it reads the store through store/ and builds
experts through quant/'s formats.
"""
