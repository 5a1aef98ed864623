"""`python -m croupier` runs the console script."""

import sys

from croupier.cli import main

sys.exit(main())
