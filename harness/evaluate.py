"""`python -m harness.evaluate ...`: the stable command name for harness.eval.evaluate (see its docstring)."""
import sys

from harness.eval.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
