"""Scripts each benchmark run executes in its own process (`python SCRIPT SPEC RESULT
[PROGRESS]`). They import nothing from edgemoe except edgemoe_run.py, which needs the
engine, so that the peers' scripts run under the peers' interpreter."""
