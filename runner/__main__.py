"""`python -m runner` runs the same CLI as `apimart-batch`."""

from runner.cli import main

raise SystemExit(main())
