#!/usr/bin/env bash
# Idempotent: the tools of the device-build static checks (compile/static_checks.py),
# which the tests and `scripts/build_matrix.py --check` skip when absent:
#   PoCL + pyopencl  (OpenCL C of fp32 android builds compiles),
#   clang            (Metal kernels pass a syntax check against a stub metal_stdlib),
#   llvm (llvm-nm)   (objects leave nothing undefined but the TVM runtime's symbols).
# Debian packages need root; without it the script says what to install and goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh

need=()
dpkg -s pocl-opencl-icd >/dev/null 2>&1 || need+=(pocl-opencl-icd)
dpkg -s ocl-icd-libopencl1 >/dev/null 2>&1 || need+=(ocl-icd-libopencl1)
command -v clang >/dev/null 2>&1 || ls /usr/bin/clang-1[4-9] >/dev/null 2>&1 || need+=(clang)
command -v llvm-nm >/dev/null 2>&1 || ls /usr/bin/llvm-nm-1[4-9] >/dev/null 2>&1 || need+=(llvm)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup_static_checks: apt-get install ${need[*]}"
    apt-get update -qq >/dev/null  # a fresh machine has no package lists
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "setup_static_checks: as root, run: apt-get install -y ${need[*]}" >&2
  fi
fi
if ! .venv/bin/python -c "import pyopencl" 2>/dev/null; then
  echo "setup_static_checks: pip install pyopencl"
  .venv/bin/python -m pip install -q pyopencl
fi
# aarch64 cross binutils (ld, nm, as): the android objects link leaving nothing
# undefined but the TVM runtime's (check_aarch64_link).  Non-fatal: on failure
# the check skips.  apt-get update only when the install fails without it.
if ! command -v aarch64-linux-gnu-ld >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup_static_checks: apt-get install binutils-aarch64-linux-gnu"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends binutils-aarch64-linux-gnu >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 \
           && apt-get install -y -qq --no-install-recommends binutils-aarch64-linux-gnu >/dev/null 2>&1; } \
      || echo "setup_static_checks: could not install binutils-aarch64-linux-gnu; the aarch64 link check will be skipped" >&2
  else
    echo "setup_static_checks: as root, run: apt-get install -y binutils-aarch64-linux-gnu" >&2
  fi
fi
