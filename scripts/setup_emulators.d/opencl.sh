#!/usr/bin/env bash
# Idempotent: the OpenCL device runtime add-on for TVM (bindings/opencl_runtime),
# so that whole OpenCL builds (target preset `android-pocl`) run on PoCL.
#   Debian packages: ocl-icd-opencl-dev (CL headers + libOpenCL.so), pocl-opencl-icd, clinfo
#   Output: .emulators/lib/libtvm_runtime_opencl.so, rebuilt only when the source,
#           this script or the TVM / tvm-ffi versions change (stamp file next to it).
# Packages need root; without it the script says what to install and goes on.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] || bash scripts/setup.sh

# shellcheck source=../lib/apt.sh
. scripts/lib/apt.sh
need=()
command -v g++ >/dev/null 2>&1 || need+=(g++)
dpkg -s ocl-icd-opencl-dev >/dev/null 2>&1 || [ -f /usr/include/CL/cl.h ] || need+=(ocl-icd-opencl-dev)
dpkg -s ocl-icd-libopencl1 >/dev/null 2>&1 || need+=(ocl-icd-libopencl1)
dpkg -s pocl-opencl-icd >/dev/null 2>&1 || need+=(pocl-opencl-icd)
command -v clinfo >/dev/null 2>&1 || need+=(clinfo)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup_emulators/opencl: apt-get install ${need[*]}"
  apt_install "${need[@]}" || exit 1
fi
if [ ! -f /usr/include/CL/cl.h ]; then
  echo "setup_emulators/opencl: no OpenCL headers (/usr/include/CL/cl.h); the OpenCL runtime add-on cannot be built" >&2
  exit 1
fi

src=bindings/opencl_runtime/opencl_runtime.cc
out=.emulators/lib/libtvm_runtime_opencl.so
stamp=$out.stamp
# include dirs, lib dirs and versions of the installed wheels, one per line
mapfile -t info < <(.venv/bin/python - <<'PY'
import os, tvm, tvm_ffi
t, f = os.path.dirname(tvm.__file__), os.path.dirname(tvm_ffi.__file__)
print(os.path.join(t, "include")); print(os.path.join(f, "include"))
print(os.path.join(t, "lib")); print(os.path.join(f, "lib"))
print(f"tvm {tvm.__version__} tvm_ffi {tvm_ffi.__version__}")
PY
)
tvm_inc=${info[0]} ffi_inc=${info[1]} tvm_lib=${info[2]} ffi_lib=${info[3]} vers=${info[4]}
# Keyed by content and by the checkout's path (the library's rpath points into .venv).
want="$vers src $(sha256sum "$src" | cut -c1-16) script $(sha256sum "$0" | cut -c1-16) at $PWD"
if [ -f "$out" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
mkdir -p "$(dirname "$out")"
echo "setup_emulators/opencl: building $out ($vers)"
dlpack=()
[ -d "$tvm_inc/../3rdparty/dlpack/include" ] && dlpack=(-I "$tvm_inc/../3rdparty/dlpack/include")
g++ -std=c++17 -O2 -shared -fPIC -w \
  -DCL_TARGET_OPENCL_VERSION=120 \
  -I "$tvm_inc" -I "$ffi_inc" "${dlpack[@]}" \
  "$src" -o "$out.tmp" \
  -L "$tvm_lib" -L "$ffi_lib" -ltvm_runtime -ltvm_ffi -lOpenCL \
  -Wl,-rpath,"$tvm_lib" -Wl,-rpath,"$ffi_lib"
mv "$out.tmp" "$out"
echo "$want" > "$stamp"
