#!/usr/bin/env bash
# Idempotent: the emulators of `qwen35-mobile parity --emulator` and the tools
# of the device-build static checks.  Each part is a script of its own, quiet
# when there is nothing to do; one that fails says why, the others go on, and
# the script exits 1 naming the parts that failed.
#   static-checks  scripts/setup_static_checks.sh  PoCL, clang (Metal syntax check), llvm-nm, pyopencl, aarch64 binutils
#   opencl         setup_emulators.d/opencl.sh     the project's OpenCL runtime add-on for the TVM wheel (C++, g++)
#   aarch64        setup_emulators.d/aarch64.sh    qemu-user, aarch64 cross gcc, a Debian arm64 Python sysroot + TVM wheels
#   webgpu         setup_emulators.d/webgpu.sh     Mesa 25 lavapipe (bookworm-backports), npm webgpu (Dawn for Node)
#   web-runtime    setup_emulators.d/web-runtime.sh  TVM's web runtime from the wheel's sources (emscripten, npm)
#   browser        setup_emulators.d/browser.sh    Chromium (Debian), playwright-core + the page's tokenizer (npm)
#   metal          (the clang of static-checks)
# Usage: setup_emulators.sh [PART ...]   (default: every part)
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh || exit 1
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(static-checks opencl aarch64 webgpu web-runtime browser)
failed=()
for name in "${parts[@]}"; do
  case "$name" in
    static-checks|metal) bash scripts/setup_static_checks.sh || failed+=("$name") ;;
    opencl|aarch64|webgpu|web-runtime|browser) bash "scripts/setup_emulators.d/$name.sh" || failed+=("$name") ;;
    *) echo "setup_emulators: unknown part '$name' (static-checks, opencl, aarch64, webgpu, web-runtime, browser, metal)" >&2; exit 2 ;;
  esac
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "setup_emulators: not installed: ${failed[*]}" >&2
  exit 1
fi
