"""What M-RoPE costs decode and prefill: the shipped library against the same
model built without the M-RoPE shift (``mrope_shift`` replaced by the
identity at export: the decoder as it was before images could be placed in a
prompt), both host builds of one random checkpoint at a real shape, timed
interleaved (A B A B ..., --rounds rounds, medians) in one process.  Prints
the CPU it ran on and the ratios.

    .venv/bin/python scripts/bench_mrope.py [--preset qwen3.5-0.8b] [--quant q4f16_1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
            return f"{line.split(':', 1)[1].strip()} ({isa}, {os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


def build(ckpt: Path, quant: str, out: Path, *, shift: bool) -> Path:
    from qwen35_mobile.compile.compiler import compile_model
    from qwen35_mobile.compile.model import qwen35

    if (out / "manifest.json").exists():
        return out
    original = qwen35.mrope_shift
    if not shift:
        qwen35.mrope_shift = lambda x, offsets, config: x
    try:
        compile_model(str(ckpt), "host", quant, out, force=True, vision=False)
    finally:
        qwen35.mrope_shift = original
    return out


def time_once(model, prompt: list[int], steps: int) -> tuple[float, float]:
    engine = model.engine
    seq = engine.add_sequence()
    try:
        t = time.perf_counter()
        logits = engine.prefill(seq, prompt)
        prefill = len(prompt) / (time.perf_counter() - t)
        token = int(np.argmax(logits))
        t = time.perf_counter()
        for _ in range(steps):
            token = int(np.argmax(engine.decode([seq], [token])[0]))
        return prefill, steps / (time.perf_counter() - t)
    finally:
        engine.remove_sequence(seq)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen3.5-0.8b")
    parser.add_argument("--quant", default="q4f16_1")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="keep checkpoint and builds here")
    args = parser.parse_args()

    from qwen35_mobile import Model
    from qwen35_mobile.parity.checkpoint import ensure_checkpoint

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-mrope-"))
    print(f"machine: {cpu_name()}")
    ckpt = ensure_checkpoint(args.preset, work, dtype="bfloat16")
    builds = {
        "with M-RoPE shift": build(ckpt, args.quant, work / "shift", shift=True),
        "without (before)": build(ckpt, args.quant, work / "plain", shift=False),
    }
    models = {name: Model.load(path) for name, path in builds.items()}
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 240000, args.prompt_tokens)]
    for model in models.values():  # warm-up: first-call allocations
        time_once(model, prompt[:8], 2)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for r in range(args.rounds):
        for name, model in models.items():
            times[name].append(time_once(model, prompt, args.decode_tokens))
            print(
                f"round {r + 1} {name}: prefill {times[name][-1][0]:.1f} tok/s, "
                f"decode {times[name][-1][1]:.2f} tok/s",
                flush=True,
            )
    med = {n: [statistics.median(t[i] for t in v) for i in (0, 1)] for n, v in times.items()}
    (a, b) = med.values()
    print(f"\n{args.preset} {args.quant}, host, medians of {args.rounds} interleaved rounds")
    print(f"| build | prefill {args.prompt_tokens} tok/s | decode tok/s |")
    print("|---|---|---|")
    for name, (p, d) in med.items():
        print(f"| {name} | {p:.1f} | {d:.2f} |")
    print(f"| ratio (with / without) | {a[0] / b[0]:.3f} | {a[1] / b[1]:.3f} |")


if __name__ == "__main__":
    main()
