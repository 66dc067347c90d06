"""`python -m benchmarks.cpu` (and `make bench`)."""

import sys

from benchmarks.cpu.cli import main

# The guard matters: multiprocessing's spawn (the in-process baseline, `trtserve profile`)
# re-imports this module by name as `__mp_main__` in every child, which must not run a bench.
if __name__ == "__main__":
    sys.exit(main())
