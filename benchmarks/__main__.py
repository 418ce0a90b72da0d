"""``python -m benchmarks``: run the scenarios, print the table, write the JSON."""

import sys

from benchmarks.harness import main

if __name__ == "__main__":
    sys.exit(main())
