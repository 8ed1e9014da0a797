"""`python -m harness.collect ...`: the stable command name for harness.analysis.collect (see its docstring)."""
import sys

from harness.analysis.collect import main

if __name__ == "__main__":
    sys.exit(main())
