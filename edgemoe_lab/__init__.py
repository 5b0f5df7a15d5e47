"""The lab: everything that measures, trains or reports on edgemoe rather than runs it.

It is a second top-level package next to `edgemoe` (installed by the same pyproject), so
that the engine ships without it and nothing called "bench" lives in two places.

- `peer/`         `edgemoe bench`: edgemoe vs llama.cpp vs transformers under memory cgroups
- `experiments/`  one script per measurement (`python -m edgemoe_lab.experiments.NAME`),
                  each writing `results/NAME.md` with the exact command and the machine
- `results/`      the recorded results (data, not a Python package)
- `work/`         scratch space of the experiments (models, converted stores; not tracked)
- `checkpoints`   the one writer of random Hugging Face checkpoints for benchmarks
- `train_tiny`    `edgemoe train-tiny`: trains the bundled tiny MoE
- `model_report`  the bundled model's quality and routing report (docs/bundled-model.md)
- `paths`         where the repository, results and work directories are

The lab imports the engine's public modules; the engine never imports the lab (only
`edgemoe.cli`'s `bench` and `train-tiny` commands reach into it, when run).
"""
