"""`python -m analysis.throughput`: see analysis/throughput/cli.py."""
from analysis.throughput.cli import main

raise SystemExit(main())
