#!/usr/bin/env bash
# Idempotent: TVM's web runtime built from the installed apache-tvm wheel's own
# sources (bindings/web_runtime: the C++ runtime as wasm objects + tvmjs), so that
# `compile --target webgpu` links model.wasm and the web parity/page tests run it.
#   Debian package: emscripten (3.1.6; its prebuilt system libraries, no cache build)
#   npm: rollup + typescript, pinned by bindings/web_runtime/tvmjs/package-lock.json
#   Output: .emulators/web-runtime/ (stamp.json: wheel versions, emcc version, our sources)
# Packages need root; without it the script says what to install and fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
# shellcheck source=../lib/apt.sh
. scripts/lib/apt.sh
if ! command -v emcc >/dev/null 2>&1; then
  echo "setup_emulators/web-runtime: apt-get install emscripten"
  apt_install emscripten || exit 1
fi
command -v npm >/dev/null || { echo "setup_emulators/web-runtime: npm (Node >= 18) is needed" >&2; exit 1; }
exec .venv/bin/python -m qwen35_mobile.bindings.web_runtime.build
