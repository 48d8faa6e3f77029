"""`python -m runner` runs the same CLI as `apimart-batch`, signal handling included."""

from runner.entry import main

raise SystemExit(main())
