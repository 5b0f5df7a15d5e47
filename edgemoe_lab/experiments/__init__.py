"""One script per measurement, each run from the repository root as
`python -m edgemoe_lab.experiments.NAME [options]` (`--help` lists the options). Each
writes its results under `edgemoe_lab/results/` starting with the exact command and the
machine, and its working files under `edgemoe_lab/work/`. Scripts import edgemoe and the
lab, never `tests/`."""
