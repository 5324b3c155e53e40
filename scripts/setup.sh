#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the project (editable)
# and its test extra (torch CPU build, transformers, pytest).  Re-runs only
# when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.setup-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing qwen35-mobile and its test extra (apache-tvm, torch CPU, transformers)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  rm -f .venv/.setup-*
  touch "$stamp"
fi
