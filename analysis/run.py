"""`python -m analysis.run`: the dataset-run CLI, kept at its documented path (the code is analysis/runs/cli.py)."""
from analysis.runs.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
