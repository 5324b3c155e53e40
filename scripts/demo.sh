#!/usr/bin/env bash
# The main job on the embedded default: a tiny random-weight Qwen3.5 compiled
# for every target, with parity checks:
#   host     q0f32 and q0f16: a generation, and parity against transformers;
#   android  q0f32: whole model + every kernel on PoCL (--emulator opencl), and
#            the aarch64 CPU code under qemu (--emulator aarch64);
#   ios      q0f16: Metal syntax check (--emulator metal), fp16 aarch64 under qemu;
#   webgpu   q0f16: every WGSL kernel on Dawn over lavapipe (--emulator webgpu).
# Reports: <artifact>/parity.json and parity-<emulator>.json + .png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_emulators.sh
export HF_HUB_OFFLINE=1
q=.venv/bin/qwen35-mobile
out=${DEMO_DIR:-demo}
ckpt="$out/tiny-checkpoint"
mkdir -p "$out"
[ -d "$ckpt" ] || $q make-checkpoint --preset tiny "$ckpt"
for quant in q0f32 q0f16; do
  $q compile --model "$ckpt" --target host --quant $quant -o "$out/tiny-$quant" --force
  $q run "$out/tiny-$quant" --prompt "Give me a short introduction to large language models." --max-new-tokens 24 --seed 0
  $q parity "$out/tiny-$quant" --reference "$ckpt" --new-tokens 32
done
$q compile --model "$ckpt" --target android --quant q0f32 -o "$out/tiny-android-q0f32" --force
$q parity "$out/tiny-android-q0f32" --reference "$ckpt" --emulator opencl
$q parity "$out/tiny-android-q0f32" --reference "$ckpt" --emulator aarch64
$q compile --model "$ckpt" --target ios --quant q0f16 -o "$out/tiny-ios-q0f16" --force
$q parity "$out/tiny-ios-q0f16" --reference "$ckpt" --emulator metal
$q parity "$out/tiny-ios-q0f16" --reference "$ckpt" --emulator aarch64
$q compile --model "$ckpt" --target webgpu --quant q0f16 -o "$out/tiny-webgpu-q0f16" --force
$q parity "$out/tiny-webgpu-q0f16" --reference "$ckpt" --emulator webgpu
echo "demo: every target compiled and checked; reports under $out/*/parity*.json"
