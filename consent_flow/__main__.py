"""``python -m consent_flow``: the ``consent-flow`` command line."""

from ._cli import main

raise SystemExit(main())
