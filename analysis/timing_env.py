"""`python -m analysis.timing_env`: what a timing would run under, kept at its documented path (analysis/timing/env.py)."""
from analysis.timing.env import main

if __name__ == "__main__":
    raise SystemExit(main())
