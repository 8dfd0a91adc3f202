"""``python -m consent_flow``: the ``consent-flow`` command line."""

from consent_flow.cli import main

raise SystemExit(main())
