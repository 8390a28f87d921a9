"""`python -m ddpmkit` is the same as the `ddpmkit` command."""
from ddpmkit.cli import main

raise SystemExit(main())
