"""``python -m rch`` runs the command line."""

from .cli import main

raise SystemExit(main())
