#!/usr/bin/env bash
# Idempotent: the WebGPU emulator of parity/emulators/webgpu.py.
#   Mesa 25 lavapipe (mesa-vulkan-drivers from bookworm-backports: Mesa 22 of
#   bookworm fails Dawn's adapter creation and has no shader-f16) + libvulkan1,
#   npm `webgpu` (Dawn for Node), pinned by parity/emulators/dawn/package-lock.json,
#   installed into .emulators/node/.
# A stamp (.emulators/webgpu.stamp, holding the lock's hash) skips all of it when done.
set -euo pipefail
cd "$(dirname "$0")/../.."
src=parity/emulators/dawn
dst=.emulators/node
stamp=.emulators/webgpu.stamp
# The stamp: the lock, this script and the checkout's path (node_modules live in it).
want="$(cat "$src/package.json" "$src/package-lock.json" "$0" scripts/lib/apt.sh | sha256sum | cut -d' ' -f1) $PWD"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && [ -d "$dst/node_modules/webgpu" ] && ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  echo "webgpu emulator: up to date"
  exit 0
fi

# --- Mesa 25 lavapipe from bookworm-backports -------------------------------
mesa_ok() {
  local v
  v="$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true)"
  [ -n "$v" ] && dpkg --compare-versions "$v" ge 24 && dpkg -s libvulkan1 >/dev/null 2>&1
}
if ! mesa_ok; then
  if [ "$(id -u)" != 0 ]; then
    echo "webgpu emulator: as root, add bookworm-backports and run:" >&2
    echo "  apt-get install -y -t bookworm-backports mesa-vulkan-drivers libvulkan1" >&2
    exit 1
  fi
  # bookworm-backports from the mirror the system's Debian sources use (deb822
  # URIs first, comment lines ignored); an entry an earlier run wrote is repaired.
  # shellcheck source=../lib/apt.sh
  . scripts/lib/apt.sh
  ensure_backports bookworm
  apt_update
  apt-get install -y -qq --no-install-recommends -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null
  mesa_ok || { echo "webgpu emulator: Mesa >= 24 not installed" >&2; exit 1; }
fi

# --- Dawn for Node ------------------------------------------------------------
command -v npm >/dev/null || { echo "webgpu emulator: npm (Node >= 18) is needed" >&2; exit 1; }
mkdir -p "$dst"
cp "$src/package.json" "$src/package-lock.json" "$dst/"
( cd "$dst" && npm ci --no-audit --no-fund --loglevel=error --foreground-scripts )

# --- Verify: an adapter on lavapipe with shader-f16 --------------------------
.venv/bin/python -c "
import sys
from qwen35_mobile.parity.emulators import webgpu
why = webgpu.available()
if why: sys.exit('webgpu emulator: ' + why)
print('webgpu emulator:', webgpu.adapter_info())
" || exit 1
echo "$want" > "$stamp"
