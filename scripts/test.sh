#!/usr/bin/env bash
# The test command: set up, then run every test. As root the lab integration tests run too
# (they boot the simulated fleet, deploy it, verify it, and take it down).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers: every lab test on one (they share one booted lab, in order), the fast tests on the other meanwhile.
exec .venv/bin/pytest -n 2 "$@"
