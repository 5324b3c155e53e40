"""Peak memory of weight conversion, against the checkpoint's size.

Writes (once, cached in --workdir) a random-weight bf16 checkpoint at a real
preset's shape (default: the 4B), then converts it in a fresh process per
quantization and reports that process's peak resident memory (ru_maxrss),
its baseline after imports, the time, and the checkpoint's size.

    .venv/bin/python scripts/bench_convert.py [--preset qwen3.5-4b] [--quant q4f16_1 q0f16]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def convert(checkpoint: str, preset: str, quant: str, out: str) -> None:
    """Child process: the parameter list (no Relax export), then the streaming conversion."""
    from qwen35_mobile.compile import pipeline
    from qwen35_mobile.compile.config import preset as get_preset
    from qwen35_mobile.compile.weights import convert_checkpoint, open_checkpoint

    exported = pipeline.parameters(get_preset(preset), quant)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    summary = convert_checkpoint(
        open_checkpoint(checkpoint), exported.expected(), out, quantize_map=exported.quantize_map
    )
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {"baseline": baseline, "peak": peak, "seconds": seconds, "nbytes": summary["nbytes"]}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen3.5-4b")
    parser.add_argument("--quant", nargs="+", default=["q4f16_1", "q0f16"])
    parser.add_argument(
        "--workdir", default=None, help="keep the checkpoint here (default: a temp dir)"
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        convert(*args.child)
        return

    from qwen35_mobile.parity.checkpoint import ensure_checkpoint

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    t = time.perf_counter()
    ckpt = ensure_checkpoint(args.preset, work, dtype="bfloat16")
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    print(
        f"checkpoint {args.preset} bf16: {ckpt_bytes / 1e9:.2f} GB ({time.perf_counter() - t:.0f} s to make or find)"
    )
    print(
        f"{'quant':10s}{'peak RSS':>12s}{'baseline':>12s}{'peak/ckpt':>11s}{'output':>10s}{'seconds':>9s}"
    )
    for quant in args.quant:
        out = work / f"converted-{quant}"
        shutil.rmtree(out, ignore_errors=True)
        child = subprocess.run(
            [sys.executable, __file__, "--child", str(ckpt), args.preset, quant, str(out)],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(child.stdout.strip().splitlines()[-1])
        print(
            f"{quant:10s}{r['peak'] / 1e9:10.2f}GB{r['baseline'] / 1e9:10.2f}GB{r['peak'] / ckpt_bytes:11.2f}"
            f"{r['nbytes'] / 1e9:8.2f}GB{r['seconds']:9.0f}"
        )
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
