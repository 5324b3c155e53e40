#!/usr/bin/env bash
# The main job on the embedded default: a tiny random-weight Qwen3.5 compiled
# for every target, with parity checks:
#   host     q0f32 and q0f16: a generation, one with an image, and parity
#            against transformers (text and image prompts);
#   android  q0f32: whole model + every kernel on PoCL (--emulator opencl), and
#            the aarch64 CPU code under qemu (--emulator aarch64);
#   ios      q0f16: Metal syntax check (--emulator metal);
#   webgpu   q0f16: every WGSL kernel on Dawn over lavapipe (--emulator webgpu).
# The fp16 aarch64 code under qemu is the slowest check (fp16 arithmetic is
# emulated instruction by instruction): the test suite runs it
# (tests/test_emulator_aarch64.py), the demo does not, to stay under 15 minutes.
# Each emulator is set up (idempotent) right before its first step.  Reports:
# <artifact>/parity.json and parity-<emulator>.json + .png; a table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
q=.venv/bin/qwen35-mobile
out=${DEMO_DIR:-demo}
ckpt="$out/tiny-checkpoint"
mkdir -p "$out"
step() { echo; echo "=== demo: $* ($((SECONDS - started)) s)"; }
emulator() { bash scripts/setup_emulators.sh "$1"; }

[ -d "$ckpt" ] || $q make-checkpoint --preset tiny "$ckpt"
photo="$out/photo.png"  # a 300x200 colour ramp with noise (the parity's second image)
[ -f "$photo" ] || .venv/bin/python -c "import sys; from PIL import Image; from qwen35_mobile.parity.report import parity_images; Image.fromarray(parity_images()[1]).save(sys.argv[1])" "$photo"
for quant in q0f32 q0f16; do
  step "host $quant: compile, generate, parity against transformers"
  $q compile --model "$ckpt" --target host --quant $quant -o "$out/tiny-$quant" --force
  $q run "$out/tiny-$quant" --prompt "Give me a short introduction to large language models." --max-new-tokens 24 --seed 0
  $q run "$out/tiny-$quant" --image "$photo" --prompt "What is in this picture?" --max-new-tokens 16 --seed 0
  $q parity "$out/tiny-$quant" --reference "$ckpt" --new-tokens 32
done
step "android q0f32: compile; OpenCL on PoCL; aarch64 under qemu"
$q compile --model "$ckpt" --target android --quant q0f32 -o "$out/tiny-android-q0f32" --force
emulator opencl
$q parity "$out/tiny-android-q0f32" --reference "$ckpt" --emulator opencl
emulator aarch64
$q parity "$out/tiny-android-q0f32" --reference "$ckpt" --emulator aarch64
step "ios q0f16: compile; Metal syntax check"
$q compile --model "$ckpt" --target ios --quant q0f16 -o "$out/tiny-ios-q0f16" --force
emulator metal
$q parity "$out/tiny-ios-q0f16" --reference "$ckpt" --emulator metal
step "webgpu q0f16: compile (+ model.wasm); the whole model through tvmjs on Dawn; every WGSL kernel"
emulator webgpu
emulator web-runtime
$q compile --model "$ckpt" --target webgpu --quant q0f16 -o "$out/tiny-webgpu-q0f16" --force
$q parity "$out/tiny-webgpu-q0f16" --reference "$ckpt" --emulator webgpu
echo
.venv/bin/python scripts/parity_table.py "$out" --seconds $((SECONDS - started))
