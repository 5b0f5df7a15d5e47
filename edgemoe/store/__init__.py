"""The expert store: `edgemoe convert` output (format.py: layout, manifest, plans;
convert.py: the streaming converter; reader.py: opening it and reading expert blobs;
tensorfile.py: safetensors without mmap)."""
