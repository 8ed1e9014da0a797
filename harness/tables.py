"""`python -m harness.tables ...`: the stable command name for harness.analysis.tables (see its docstring)."""
import sys

from harness.analysis.tables import main

if __name__ == "__main__":
    sys.exit(main())
