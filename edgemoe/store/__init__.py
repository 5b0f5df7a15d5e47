"""Model files on disk: what `edgemoe convert` writes and everything that reads checkpoints.

- manifest.py: the converted layout (manifest v1-v5 with checksums, blob layouts, plans);
  names.py: what a path is (a converted directory, a GGUF file).
- convert.py: the streaming converter (Hugging Face directory or GGUF in, resident weights
  + expert store + manifest out, atomically); reader.py: opening a converted directory and
  reading expert blobs (O_DIRECT, checksums, read throttle in throttle.py).
- gguf.py, gguf_archs.py, gguf_rope.py: GGUF files through the `gguf` package; tensorfile.py:
  safetensors without mmap.

Computes nothing: expert encodings come from quant/, tensor names from models/ sanitize.
"""
