"""Computations and figure builders behind the pages; importable without streamlit."""
from analysis.timing.preload import rerun_under_tcmalloc

rerun_under_tcmalloc()  # only for `python -m analysis...` (see analysis/timing/preload.py)
