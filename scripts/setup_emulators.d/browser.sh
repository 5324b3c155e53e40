#!/usr/bin/env bash
# Idempotent: a real browser for the web page tests (`qwen35-mobile serve`).
#   Debian package: chromium (headless, WebGPU on SwiftShader: no shader-f16, so
#   float32 builds); npm: playwright-core (drives the system Chromium; its own browser
#   downloads cannot work here) and @mlc-ai/web-tokenizers (the page's tokenizer),
#   pinned by parity/emulators/browser/package-lock.json, into .emulators/browser.
# A stamp (.emulators/browser.stamp) skips it all when done.
set -euo pipefail
cd "$(dirname "$0")/../.."
src=parity/emulators/browser
dst=.emulators/browser
stamp=.emulators/browser.stamp
want="$(cat "$src/package.json" "$src/package-lock.json" "$0" | sha256sum | cut -d' ' -f1) $PWD"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -d "$dst/node_modules/playwright-core" ] \
   && command -v chromium >/dev/null 2>&1; then
  exit 0
fi
# shellcheck source=../lib/apt.sh
. scripts/lib/apt.sh
if ! command -v chromium >/dev/null 2>&1; then
  echo "setup_emulators/browser: apt-get install chromium"
  apt_install chromium || exit 1
fi
command -v npm >/dev/null || { echo "setup_emulators/browser: npm (Node >= 18) is needed" >&2; exit 1; }
mkdir -p "$dst"
cp "$src/package.json" "$src/package-lock.json" "$dst/"
( cd "$dst" && npm ci --no-audit --no-fund --loglevel=error --ignore-scripts )
echo "$want" > "$stamp"
