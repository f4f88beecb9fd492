from analysis.bench.suite import main

raise SystemExit(main())
