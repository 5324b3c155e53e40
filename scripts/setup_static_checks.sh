#!/usr/bin/env bash
# Idempotent: the tools of the device-build static checks (parity/static_checks.py):
#   PoCL + pyopencl  (OpenCL C of fp32 android builds compiles),
#   clang            (Metal kernels pass a syntax check against a stub metal_stdlib),
#   llvm (llvm-nm)   (objects leave nothing undefined but the TVM runtime's symbols),
#   aarch64 binutils (the android objects link: check_aarch64_link).
# Debian packages need root; without it the script says what to install and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
# shellcheck source=lib/apt.sh
. scripts/lib/apt.sh

need=()
dpkg -s pocl-opencl-icd >/dev/null 2>&1 || need+=(pocl-opencl-icd)
dpkg -s ocl-icd-libopencl1 >/dev/null 2>&1 || need+=(ocl-icd-libopencl1)
command -v clang >/dev/null 2>&1 || ls /usr/bin/clang-1[4-9] >/dev/null 2>&1 || need+=(clang)
command -v llvm-nm >/dev/null 2>&1 || ls /usr/bin/llvm-nm-1[4-9] >/dev/null 2>&1 || need+=(llvm)
command -v aarch64-linux-gnu-ld >/dev/null 2>&1 || need+=(binutils-aarch64-linux-gnu)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup_static_checks: apt-get install ${need[*]}"
  apt_install "${need[@]}" || exit 1
fi
if ! .venv/bin/python -c "import pyopencl" 2>/dev/null; then
  echo "setup_static_checks: pip install pyopencl"
  .venv/bin/python -m pip install -q pyopencl
fi
