"""`python -m kimbho` is the `kimbho` command."""

from .cli import main

raise SystemExit(main())
