"""`python -m bench.train_compare`: the entry point of the training comparison study.

The study lives in `bench.studies.train_compare` (with `--corpus natural`, the natural study
of `bench.studies.train_natural`); this module keeps the command at its documented path.
"""

from __future__ import annotations

import sys

from bench.studies.train_compare import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
