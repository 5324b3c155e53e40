"""Vision-tower encode benchmark: the compiled image_embed against transformers.

For each preset's real tower shape (random weights, the same values on both
sides) and each quantization, one 448x448 image (196 tokens, 784 patches) is
encoded by our host build of the tower alone (``image_embed``) and by
transformers' ``Qwen3_5VisionModel`` (PyTorch CPU, fp32) on the processor's
pixel values, medians of --rounds after a warm-up; each side runs in a
process of its own (one after the other, on the same machine in the same run)
so that its peak resident memory is its own.  Prints the CPU it ran on and the
ratios.  The build of our tower is not timed.

    .venv/bin/python scripts/bench_vision.py [--preset qwen3.5-0.8b qwen3.5-2b] [--quant q0f32 q4f16_1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SIDE = 448


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = Path("/proc/cpuinfo").read_text()
                isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "?"
                return f"{name} ({os.cpu_count()} threads, {isa})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _weights(preset: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tower weights by our parameter names (the checkpoint writer's distributions)."""
    from qwen35_mobile.compile.config import preset as get_preset
    from qwen35_mobile.parity.checkpoint import _draw, _vision_tower

    specs = _vision_tower(get_preset(preset).vision)
    return {f"visual.{name}": _draw(name, spec, seed) for name, spec in specs.items()}


def _image() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


def child_ours(preset: str, quant: str, rounds: int, lib_dir: str) -> dict:
    """Build (into lib_dir) and time the tower alone for the host."""
    import resource

    import tvm
    from tvm import relax

    from qwen35_mobile.compile import pipeline, quantization
    from qwen35_mobile.compile.config import ImageProcessorConfig
    from qwen35_mobile.compile.config import preset as get_preset
    from qwen35_mobile.compile.kernels import kernel_set_for
    from qwen35_mobile.targets import get_target

    host = get_target("host")
    q = quantization.get(quant)
    tower = pipeline._vision_model(
        get_preset(preset), q, ImageProcessorConfig(), kernel_set_for(host, q.model_dtype)
    )
    spec = tower.get_default_spec()
    mod, named = tower.export_tvm(spec=spec)
    exported = pipeline.Exported(
        mod, {"vision": pipeline.EntryPoint(list(spec.method_names), [])}, q
    )
    lib = Path(lib_dir) / f"{preset}-{quant}.so"
    t0 = time.perf_counter()
    pipeline.build(exported, host, lib)
    build_s = time.perf_counter() - t0
    weights = _weights(preset)
    dev = tvm.cpu()
    params = [tvm.runtime.tensor(weights[n].astype(p.dtype), dev) for n, p in named]
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), dev)
    pixels = tvm.runtime.tensor(_image(), dev)
    out = vm["image_embed"](pixels, params)  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        out = vm["image_embed"](pixels, params)
        out.numpy()
        times.append(time.perf_counter() - t)
    return {
        "seconds": times,
        "build_s": build_s,
        "tokens": int(out.shape[0]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def child_theirs(preset: str, rounds: int) -> dict:
    import resource

    import torch
    from PIL import Image
    from transformers import Qwen3_5VisionConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    from qwen35_mobile.compile.config import ImageProcessorConfig
    from qwen35_mobile.compile.config import preset as get_preset

    v = get_preset(preset).vision
    config = {k: val for k, val in v.to_json().items() if k != "model_type"}
    model = Qwen3_5VisionModel(Qwen3_5VisionConfig(**config)).eval()
    state = {n.removeprefix("visual."): torch.from_numpy(a) for n, a in _weights(preset).items()}
    model.load_state_dict(state, strict=True)
    hf = ImageProcessorConfig().to_hf()
    processor = Qwen2VLImageProcessorPil(
        **{k: val for k, val in hf.items() if k not in ("image_processor_type", "processor_class")}
    )
    features = processor(images=[Image.fromarray(_image())], return_tensors="pt")
    times = []
    with torch.no_grad():
        model(features["pixel_values"], grid_thw=features["image_grid_thw"])  # warm-up
        for _ in range(rounds):
            t = time.perf_counter()
            out = model(features["pixel_values"], grid_thw=features["image_grid_thw"])
            times.append(time.perf_counter() - t)
    return {
        "seconds": times,
        "tokens": int(out.pooler_output.shape[0]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _run_child(args: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=["qwen3.5-0.8b", "qwen3.5-2b"])
    parser.add_argument("--quant", nargs="+", default=["q0f32", "q4f16_1"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, preset, *rest = args.child
        result = (
            child_ours(preset, rest[0], args.rounds, rest[1])
            if kind == "ours"
            else child_theirs(preset, args.rounds)
        )
        print(json.dumps(result))
        return 0

    print(f"CPU: {_cpu()}; image {SIDE}x{SIDE}; medians of {args.rounds} runs after a warm-up")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.preset:
            theirs = _run_child(["theirs", preset])
            for quant in args.quant:
                ours = _run_child(["ours", preset, quant, tmp])
                a, b = statistics.median(ours["seconds"]), statistics.median(theirs["seconds"])
                rows.append(
                    f"| {preset} | {quant} | {ours['tokens']} | {a * 1000:.0f} | {b * 1000:.0f} | "
                    f"{b / a:.2f}x | {ours['peak_rss_mb']:.0f} | {theirs['peak_rss_mb']:.0f} |"
                )
    print(
        "| model | quant | tokens | ours ms | transformers fp32 ms | speed-up | ours peak MB | "
        "transformers peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
