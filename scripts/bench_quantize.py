"""Benchmark the decode GEMV with group-quantized weights against fp16/fp32 weights.

Shapes of Qwen3.5-0.8B (one row, ``x [1, 1, K] @ W^T``, fp32 accumulation):
  * MLP gate/up  (K=1024, N=3584)
  * MLP down     (K=3584, N=1024)
  * lm_head      (K=1024, N=248320; tied to the embedding in 0.8B)

Each case is a one-layer nn module exported with a symbolic batch (the decode
spec) and built with ``cpu_pipeline`` for the host CPU, exactly as the model's
layers are:
  * q4f16_1 / q4f32_1: :class:`QuantizedLinear` (dequantization fused in the GEMV),
  * q0f16 / q0f32: ``nn.Linear`` with fp16 / fp32 weights (``out_dtype`` float32).
Activations are in the model dtype (fp16 for q4f16_1 and q0f16).

Two regimes are timed: "hot", the same weights every call (they stay in the
caches when they fit: 2-15 MB for the MLP shapes), and "cold", calls cycling
over copies of the weights totalling >= --cold-mb MB, so that every call
streams its weights from DRAM, as a decode step over the whole model does.
GB/s counts the weight bytes (packed + scales for q4) read once per call; the
"vs q0f16" columns are time ratios (< 1: quantized is faster).  The yardstick
is a large numpy copy (read + write bytes).  TVM uses TVM_NUM_THREADS threads,
set to the CPU count unless given.  Results are checked against numpy first.

With --prefill M, the MLP shapes are also timed with M rows (the GEMM branch
of the schedule, where the dequantization happens once per call while the
weight panels are packed).

Usage: python scripts/bench_quantize.py [--quick] [--rounds N] [--cold-mb MB] [--prefill M]
(--quick skips the lm_head)
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

HIDDEN, INTER, VOCAB = 1024, 3584, 248320
FORMATS = ["q4f16_1", "q4f32_1", "q0f16", "q0f32"]


def _cases(quick: bool) -> list[tuple[str, int, int]]:
    cases = [("gate/up", HIDDEN, INTER), ("down", INTER, HIDDEN)]
    if not quick:
        cases.append(("lm_head", HIDDEN, VOCAB))
    return cases


def _best(fn, seconds: float = 0.5, min_runs: int = 5) -> float:
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def memory_bandwidth() -> float:
    """GB/s of a 512 MiB numpy copy, read plus write bytes."""
    src = np.ones(128 * 1024 * 1024, dtype=np.float32)
    dst = np.empty_like(src)
    return 2 * src.nbytes / _best(lambda: np.copyto(dst, src), seconds=1.0) / 1e9


def build(fmt: str, k: int, n: int, target, cold_bytes: int):
    """(vm function, args, cold-run args list, reference output, weight bytes) for one case."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend import nn

    from qwen35_mobile.compile.model.quantized import QuantizedLinear
    from qwen35_mobile.compile.quantization import dequantize_weight, quantize_weight
    from qwen35_mobile.compile.schedule_cpu import cpu_pipeline

    dtype = "float16" if fmt in ("q4f16_1", "q0f16") else "float32"

    class Layer(nn.Module):
        def __init__(self):
            if fmt.startswith("q4"):
                self.proj = QuantizedLinear(k, n, fmt, "float32")
            else:
                self.proj = nn.Linear(k, n, bias=False, dtype=dtype, out_dtype="float32")

        def decode(self, x: nn.Tensor):
            return self.proj(x)

    spec = {
        "decode": {
            "x": nn.spec.Tensor(["batch", 1, k], dtype),
            "$": {"param_mode": "packed", "effect_mode": "none"},
        }
    }
    mod, _ = Layer().export_tvm(spec=spec)
    ex = tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())

    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k), dtype=np.float32) * 0.05
    if fmt.startswith("q4"):
        packed, scale = quantize_weight(w, fmt)
        params = [packed, scale]
        w_ref = dequantize_weight(packed, scale, fmt)
    else:
        params = [w.astype(dtype)]
        w_ref = params[0].astype(np.float32)
    del w
    x = rng.standard_normal((1, 1, k), dtype=np.float32).astype(dtype)
    ref = x.astype(np.float32)[0] @ w_ref.T
    nbytes = sum(p.nbytes for p in params)
    x_dev = tvm.runtime.tensor(x)
    args = [x_dev, [tvm.runtime.tensor(p) for p in params]]
    copies = max(2, -(-cold_bytes // nbytes)) if nbytes < cold_bytes else 1
    cold = [args] + [[x_dev, [tvm.runtime.tensor(p) for p in params]] for _ in range(copies - 1)]
    return vm["decode"], args, cold, ref, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the lm_head (248320 x 1024)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved timing rounds (best kept)"
    )
    parser.add_argument(
        "--cold-mb", type=int, default=512, help="weight copies cycled over in the cold runs"
    )
    parser.add_argument(
        "--prefill", type=int, default=0, metavar="M", help="also time M-row matmuls (MLP shapes)"
    )
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count()))

    from qwen35_mobile.compile.schedule_cpu import cpu_target

    target = cpu_target({"kind": "llvm", "mcpu": "native"})
    print(
        f"target mcpu={target.attrs.get('mcpu')}  TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}  "
        f"load={os.getloadavg()[0]:.2f}"
    )
    print(f"numpy copy bandwidth: {memory_bandwidth():.1f} GB/s (read + write)")
    print(
        f"{'case':<9} {'fmt':<8} {'weight MB':>10} | {'hot ms':>8} {'GB/s':>6} {'vs q0f16':>8} | "
        f"{'cold ms':>8} {'GB/s':>6} {'vs q0f16':>8} {'vs q0f32':>8}"
    )
    for name, k, n in _cases(args.quick):
        hot, cold = {}, {}
        for fmt in FORMATS:
            fn, fargs, copies, ref, nbytes = build(fmt, k, n, target, args.cold_mb << 20)
            got = fn(*fargs).numpy()[0]
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

            def run(fn=fn, calls=None):
                for c in calls:
                    fn(*c)

            # Both regimes time the same number of back-to-back calls (a lone
            # call's best time flatters a busy machine); only the footprint differs.
            hot[fmt] = (
                lambda run=run, calls=[fargs] * len(copies): run(calls=calls),  # noqa: B008 (bound now, on purpose)
                nbytes,
                len(copies),
            )
            cold[fmt] = (lambda run=run, calls=copies: run(calls=calls), nbytes, len(copies))
        times = {(kind, fmt): float("inf") for kind in ("hot", "cold") for fmt in FORMATS}
        for _ in range(args.rounds):  # interleaved: a busy moment hits every format alike
            for kind, table in (("hot", hot), ("cold", cold)):
                for fmt, (run, _, calls) in table.items():
                    times[kind, fmt] = min(times[kind, fmt], _best(run, min_runs=3) / calls)
        for fmt in FORMATS:
            nbytes = hot[fmt][1]
            th, tc = times["hot", fmt], times["cold", fmt]
            print(
                f"{name:<9} {fmt:<8} {nbytes / 1e6:>10.1f} | {th * 1e3:>8.3f} {nbytes / th / 1e9:>6.1f} "
                f"{th / times['hot', 'q0f16']:>8.2f} | {tc * 1e3:>8.3f} {nbytes / tc / 1e9:>6.1f} "
                f"{tc / times['cold', 'q0f16']:>8.2f} {tc / times['cold', 'q0f32']:>8.2f}"
            )
        del hot, cold
    if args.prefill:
        import tvm

        print(f"\nprefill, {args.prefill} rows (hot)")
        for name, k, n in _cases(True):
            times = {}
            for fmt in FORMATS:
                fn, fargs, _, _, _ = build(fmt, k, n, target, 0)
                x = (
                    np.random.default_rng(0)
                    .standard_normal((args.prefill, 1, k))
                    .astype(fargs[0].numpy().dtype)
                )
                call = [tvm.runtime.tensor(x), fargs[1]]
                times[fmt] = min(
                    _best(lambda fn=fn, call=call: fn(*call)) for _ in range(args.rounds)
                )
            cols = "  ".join(
                f"{fmt} {t * 1e3:.2f} ms ({t / times['q0f16']:.2f})" for fmt, t in times.items()
            )
            print(f"{name:<8} {cols}")


if __name__ == "__main__":
    main()
