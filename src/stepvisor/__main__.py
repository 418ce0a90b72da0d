"""``python -m stepvisor``: the same command line as the ``stepvisor`` script."""

from stepvisor.cli.main import main

raise SystemExit(main())
