"""`python -m pplex`: the same as the `pplex` command."""
import sys

from pplex.cli import main

sys.exit(main())
