"""`edgemoe bench`: edgemoe side by side with llama.cpp and transformers (accelerate disk
offload) on the same weights and the same token stream, each engine in its own process
inside a memory cgroup whose limit is a fraction of the quantized model size.

`edgemoe/cli/bench.py` parses and checks the flags; everything else is here, in the lab.

Modules:
- `harness`   one comparison from start to end (`Bench`): preparation, the reference run
              that fixes the token stream, every engine at every budget, the results
- `cgroup`    create, limit, join, measure and remove memory cgroups (v1 or v2)
- `machine`   page-cache drops, CPU load and quiet waits, disk bandwidth, machine description
- `model`     the benchmark model (random Mixtral-shaped checkpoint, written by
              edgemoe_lab.checkpoints, or the bundled one) and its converted forms: edgemoe
              stores and GGUF files
- `configs`   the table of engine configurations
- `runner`    one engine run: a child process in a fresh cgroup, with a time limit
- `report`    result rows, medians with min/max, the markdown table and the plots
- `peers`     the peers' virtual environment (llama.cpp bindings, gguf, accelerate)
- `children/` the scripts each run executes; they import only their own engine
"""
