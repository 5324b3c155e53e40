#!/usr/bin/env bash
# The test command: set up (idempotent), then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The emulators and the static-check tools (scripts/setup_emulators.sh); the
# tests of any that cannot be installed skip, saying so.
bash scripts/setup_emulators.sh || echo "test: some emulators are not installed; their tests will be skipped"
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q -rs tests "$@"  # -rs: every skip says why
