"""`python -m bsnas <command> ...` (see bsnas.cli)."""
from bsnas.cli import main

raise SystemExit(main())
