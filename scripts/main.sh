#!/usr/bin/env bash
# Set up the environment (idempotent) and run the main job: the scaling sweep on the bundled digits.
# Extra arguments are passed to the sweep (e.g. overrides, --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m harness.sweep sweeps/scaling.yaml "$@"
