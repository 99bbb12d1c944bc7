"""`python -m toolkit.bench`: see toolkit/bench/cli.py."""

import sys

from toolkit.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
