"""`python -m bench.train_natural`: the entry point of the natural-corpus training study.

The study lives in `bench.studies.train_natural`; this module keeps the command next to
`python -m bench.train_compare` (whose `--corpus natural` runs the same study, same flags).
"""

from __future__ import annotations

import sys

from bench.studies.train_natural import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
