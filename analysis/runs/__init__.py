"""Dataset-scale runs: the task table, one module per task, run folders and the `python -m analysis.run` CLI."""
