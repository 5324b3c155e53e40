#!/usr/bin/env bash
# Idempotent: every emulator of `qwen35-mobile parity --emulator` and the tools
# of the device-build static checks.  Each part is a script of its own, quiet
# when there is nothing to do; one that fails says why and the others go on
# (the tests of an emulator that is not installed skip, naming what is missing).
#   scripts/setup_static_checks.sh   PoCL, clang (Metal syntax check), llvm-nm, pyopencl, aarch64 binutils
#   setup_emulators.d/opencl.sh      the project's OpenCL runtime add-on for the TVM wheel (C++, g++)
#   setup_emulators.d/aarch64.sh     qemu-user, aarch64 cross gcc, a Debian arm64 Python sysroot + TVM wheels
#   setup_emulators.d/webgpu.sh      Mesa 25 lavapipe (bookworm-backports), npm webgpu (Dawn for Node)
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
failed=()
bash scripts/setup_static_checks.sh || failed+=(static-checks)
for part in scripts/setup_emulators.d/*.sh; do
  name="$(basename "$part" .sh)"
  bash "$part" || failed+=("$name")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "setup_emulators: not installed: ${failed[*]} (their tests will skip, saying why)" >&2
  exit 1
fi
