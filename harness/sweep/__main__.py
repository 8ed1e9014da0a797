"""`python -m harness.sweep SPEC.yaml ...`: harness.sweep.driver."""
import sys

from harness.sweep.driver import main

if __name__ == "__main__":
    sys.exit(main())
