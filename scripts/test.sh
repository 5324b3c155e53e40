#!/usr/bin/env bash
# The test command: set up (idempotent), then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The device-build static checks (PoCL, clang, llvm-nm, pyopencl); their tests
# skip, saying so, when a tool cannot be installed here.
bash scripts/setup_static_checks.sh || echo "test: static-check tools not installed; those checks will be skipped"
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q tests "$@"
