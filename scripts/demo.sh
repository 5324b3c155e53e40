#!/usr/bin/env bash
# The main job on the embedded default: a tiny random-weight Qwen3.5, compiled
# for the host in fp32 and fp16, a generation, and parity against transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
q=.venv/bin/qwen35-mobile
out=${DEMO_DIR:-demo}
mkdir -p "$out"
[ -d "$out/tiny-checkpoint" ] || $q make-checkpoint --preset tiny "$out/tiny-checkpoint"
for quant in q0f32 q0f16; do
  $q compile --model "$out/tiny-checkpoint" --target host --quant $quant -o "$out/tiny-$quant" --force
  $q run "$out/tiny-$quant" --prompt "Give me a short introduction to large language models." --max-new-tokens 24 --seed 0
  $q parity "$out/tiny-$quant" --reference "$out/tiny-checkpoint" --new-tokens 32
done
