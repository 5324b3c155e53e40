#!/usr/bin/env bash
# Idempotent: the aarch64 emulator of parity/emulators/aarch64.py.
#   - qemu-user-static and the aarch64 cross compiler (Debian packages);
#   - a sysroot .emulators/aarch64-sysroot with Debian bookworm's arm64 Python 3.11
#     (unpacked .debs, never installed) and the aarch64 wheels of the host's
#     apache-tvm / apache-tvm-ffi / numpy / ml_dtypes / typing_extensions;
#   - a `qwen35_mobile` symlink to this repository on the sysroot Python's path.
# binfmt is not mounted here: run `qemu-aarch64-static -L SYSROOT SYSROOT/usr/bin/python3.11`.
# Quiet unless it does something; a stamp file makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SYSROOT=$ROOT/.emulators/aarch64-sysroot
SITE=$SYSROOT/usr/lib/python3/dist-packages
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || bash scripts/setup.sh

say() { echo "setup_emulators/aarch64: $*"; }
# shellcheck source=../lib/apt.sh
. scripts/lib/apt.sh

# The versions the sysroot must match (what the host .venv runs).
hostver() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
TVM_VER=$(hostver apache-tvm)
FFI_VER=$(hostver apache-tvm-ffi)
NUMPY_VER=$(hostver numpy)
MLD_VER=$(hostver ml_dtypes)
TE_VER=$(hostver typing_extensions)
# Keyed by the wheels, this script and the checkout's path: the sysroot's
# qwen35_mobile is a symlink to this checkout, so a moved checkout must relink.
WANT="tvm=$TVM_VER ffi=$FFI_VER numpy=$NUMPY_VER ml_dtypes=$MLD_VER typing_extensions=$TE_VER script=$(sha256sum "$0" | cut -c1-16) root=$ROOT"
WHEELS="tvm=$TVM_VER ffi=$FFI_VER numpy=$NUMPY_VER ml_dtypes=$MLD_VER typing_extensions=$TE_VER"
STAMP=$SYSROOT/.stamp

# 1. Host tools.
need=()
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu)
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need+=(g++-aarch64-linux-gnu)
command -v aarch64-linux-gnu-objdump >/dev/null 2>&1 || need+=(binutils-aarch64-linux-gnu)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "setup_emulators/aarch64: as root, run: apt-get install -y ${need[*]}" >&2; exit 1; }
  say "apt-get install ${need[*]}"
  apt_install "${need[@]}" || exit 1
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ "$(readlink "$SITE/qwen35_mobile")" = "$ROOT" ]; then
  exit 0
fi

# 2. The arm64 Python from Debian bookworm, unpacked into the sysroot.
DEBS=(
  libc6 libgcc-s1 libstdc++6 zlib1g libffi8 libssl3 libexpat1 libbz2-1.0 liblzma5 libzstd1
  libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1 libcrypt1 libnsl2 libtirpc3
  libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1 libdb5.3
  python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
)
if [ ! -x "$SYSROOT/usr/bin/python3.11" ] || [ ! -f "$SYSROOT/.debs" ] || [ "$(cat "$SYSROOT/.debs")" != "${DEBS[*]}" ]; then
  [ "$(id -u)" = 0 ] || { echo "setup_emulators/aarch64: needs root (dpkg --add-architecture arm64)" >&2; exit 1; }
  say "unpacking Debian arm64 python3.11 into $SYSROOT"
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    APT_UPDATED=0
    apt_update
  fi
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  pkgs=("${DEBS[@]/%/:arm64}")
  (cd "$dl" && { apt-get download "${pkgs[@]}" >/dev/null 2>&1 || { apt_update && apt-get download "${pkgs[@]}" >/dev/null; }; })
  mkdir -p "$SYSROOT"
  for deb in "$dl"/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
  # Debian's python finds its site directory via /usr/lib/python3/dist-packages.
  mkdir -p "$SITE"
  printf '%s\n' "${DEBS[*]}" > "$SYSROOT/.debs"
fi

# 3. The aarch64 wheels matching the host's versions.
if [ ! -f "$SYSROOT/.wheels" ] || [ "$(cat "$SYSROOT/.wheels")" != "$WHEELS" ]; then
  say "pip install aarch64 wheels (apache-tvm $TVM_VER, apache-tvm-ffi $FFI_VER, numpy $NUMPY_VER) into the sysroot"
  rm -rf "$SITE"
  mkdir -p "$SITE"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$SITE" \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
    "apache-tvm==$TVM_VER" "apache-tvm-ffi==$FFI_VER" "numpy==$NUMPY_VER" "ml_dtypes==$MLD_VER" \
    "typing_extensions==$TE_VER" 2> >(grep -v "^WARNING: Location" >&2)
  printf '%s\n' "$WHEELS" > "$SYSROOT/.wheels"
fi

# 4. The project itself, by a symlink (never a copy).
ln -sfn "$ROOT" "$SITE/qwen35_mobile"
printf '%s\n' "$WANT" > "$STAMP"
say "ready: qemu-aarch64-static -L $SYSROOT $SYSROOT/usr/bin/python3.11"
