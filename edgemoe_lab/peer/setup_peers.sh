#!/usr/bin/env bash
# Set up the peers of `edgemoe bench` (llama.cpp's Python bindings with its GGUF converter and
# quantizer, gguf, sentencepiece, accelerate) in their own virtual environment under
# edgemoe_lab/work/peer/peers. Part of the benchmark's set-up, not of the test suite; run after `make setup`.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
exec .venv/bin/edgemoe bench --setup "$@"
