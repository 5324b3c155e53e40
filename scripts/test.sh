#!/usr/bin/env bash
# The test command: set up (idempotent), then the whole suite.
# Under CI=true (CI sets it) an emulator or static-check tool that cannot be
# installed fails the run here, with the reason; outside CI the run goes on and
# the tests of what is missing skip, saying why (pytest -rs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! bash scripts/setup_emulators.sh; then
  if [ "${CI:-}" = true ]; then
    echo "test: CI=true and an emulator could not be installed (above); failing" >&2
    exit 1
  fi
  echo "test: some emulators are not installed; their tests will skip, saying why"
fi
export HF_HUB_OFFLINE=1
# One worker per core (QWEN35_TEST_WORKERS overrides), each taking whole test files
# (a file's module fixtures, e.g. a qemu run, are made once); the artifacts the
# files share are compiled once per session (tests/conftest.py).
workers=${QWEN35_TEST_WORKERS:-$(nproc)}
exec .venv/bin/python -m pytest -q -rs --durations=25 -n "$workers" --dist loadfile tests "$@"  # -rs: every skip says why; the 25 slowest tests listed
