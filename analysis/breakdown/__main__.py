"""`python -m analysis.breakdown`: see analysis/breakdown/cli.py."""
from analysis.breakdown.cli import main

raise SystemExit(main())
