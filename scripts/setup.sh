#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the project (editable)
# and its test extra (torch CPU build, transformers, pytest, ruff, ...).  Re-runs
# when pyproject.toml changes; a moved checkout gets a new .venv (a venv's
# scripts and the editable install hold absolute paths).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=".venv/.setup-$(printf '%s %s' "$(sha256sum pyproject.toml scripts/setup.sh)" "$PWD" | sha256sum | cut -c1-16)"
if [ -x .venv/bin/python ] && [ ! -f "$stamp" ] && ! grep -qs "^$PWD/.venv\$" .venv/.root; then
  echo "setup: .venv was made for another checkout path; making a new one"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
  echo "$PWD/.venv" > .venv/.root
fi
if [ ! -f "$stamp" ]; then
  echo "setup: installing qwen35-mobile and its test extra (apache-tvm, torch CPU, transformers)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  rm -f .venv/.setup-*
  touch "$stamp"
fi
