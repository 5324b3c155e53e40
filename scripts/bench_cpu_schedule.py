"""Benchmark the CPU matmul schedules at Qwen3.5-0.8B shapes against numpy and torch.

Times, for float32 and float16 weights (fp32 activations, fp32 accumulation):
  * prefill GEMM, M = 128 rows: the MLP's gate/up (K=1024, N=3584) and down (K=3584, N=1024);
  * decode GEMV, M = 1 row: the same two and the lm_head (K=1024, N=248320, 1 GB in fp32).
Each kernel is the function ``FuseTransposeMatmul`` makes of ``x @ W.T`` (symbolic M),
scheduled by ``schedule_for_cpu`` and built for the host CPU.

GFLOP/s counts 2*M*N*K; GB/s counts the weight bytes read once.  The memory
bandwidth yardstick is a large numpy copy (read + write bytes).  numpy is
timed under the environment as given and, in a child process, with
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset (this machine's environment pins
an old OpenBLAS core type; see the project's environment notes).

TVM runs with TVM_NUM_THREADS threads, set here to the number of CPUs unless
given (TVM's own default on x86 is half the hardware threads: 1 on 2 vCPUs).
Other processes on the machine skew every column, OpenBLAS's most: every
kernel is timed in several rounds, interleaved, and its best time kept; the
load average is printed.

Usage: python scripts/bench_cpu_schedule.py [--quick] [--rounds N]   (--quick skips the lm_head)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

HIDDEN, INTER, VOCAB = 1024, 3584, 248320
PREFILL_ROWS = 128
DTYPES = ("float32", "float16")


def _cases(quick: bool) -> list[tuple[str, int, int, int]]:
    """(name, M, K, N) of the timed matmuls."""
    cases = [
        ("prefill gate/up", PREFILL_ROWS, HIDDEN, INTER),
        ("prefill down", PREFILL_ROWS, INTER, HIDDEN),
        ("decode gate/up", 1, HIDDEN, INTER),
        ("decode down", 1, INTER, HIDDEN),
    ]
    if not quick:
        cases.append(("decode lm_head", 1, HIDDEN, VOCAB))
    return cases


def _best(fn: Callable[[], object], seconds: float = 0.3, at_most: int = 30) -> float:
    """Best wall time of ``fn`` over up to ``at_most`` runs (about ``seconds`` in all), after a warm-up."""
    fn()
    best, spent, runs = float("inf"), 0.0, 0
    while runs < max(3, at_most) and (spent < seconds or runs < 3):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


def measure(kernels: dict, rounds: int) -> dict:
    """Best time of every kernel over ``rounds`` interleaved rounds."""
    out = {key: float("inf") for key in kernels}
    for _ in range(rounds):
        for key, fn in kernels.items():
            out[key] = min(out[key], _best(fn))
    return out


# ---------------------------------------------------------------- kernels
def numpy_kernels(quick: bool) -> dict:
    """numpy (OpenBLAS) fp32 ``x @ W.T``, keyed by case name."""
    rng = np.random.default_rng(0)
    out = {}
    for name, m, k, n in _cases(quick):
        a = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32)
        out[name] = lambda a=a, w=w: a @ w.T
    return out


def torch_kernels(quick: bool) -> dict:
    """torch CPU ``F.linear``, keyed by (case name, weight dtype); fp16 runs in fp16."""
    import torch

    out = {}
    for name, m, k, n in _cases(quick):
        for dtype in DTYPES:
            w = torch.randn(n, k).to(getattr(torch, dtype))
            x = torch.randn(m, k).to(w.dtype)

            def run(x=x, w=w):
                with torch.inference_mode():
                    return torch.nn.functional.linear(x, w)

            out[(name, dtype)] = run
    return out


def nt_matmul(k: int, n: int, weight_dtype: str):
    """``C[0, i, j] = sum_k A[0, i, k] * W[j, k]`` in fp32, symbolic M, as FuseTransposeMatmul emits it."""
    from tvm import te, tirx

    def i64(value):  # the model's shapes are int64
        return tirx.IntImm("int64", value)

    m = tirx.Var("seq_len", "int64")
    a = te.placeholder((i64(1), m, i64(k)), "float32", name="A")
    w = te.placeholder((i64(n), i64(k)), weight_dtype, name="W")
    r = te.reduce_axis((i64(0), i64(k)), "k")
    c = te.compute(
        (i64(1), m, i64(n)),
        lambda b, i, j: te.sum(a[b, i, r] * w[j, r].astype("float32"), axis=r),
        name="NT_matmul",
    )
    return te.create_prim_func([a, w, c])


def tvm_kernels(quick: bool) -> dict:
    """Scheduled TVM kernels (checked against numpy), keyed by (case name, weight dtype)."""
    import tvm

    from qwen35_mobile.compile.schedule_cpu import cpu_target, schedule_for_cpu

    target = cpu_target({"kind": "llvm", "mcpu": "native"})
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    out = {}
    for name, m, k, n in _cases(quick):
        for dtype in DTYPES:
            mod = schedule_for_cpu(tvm.IRModule({"main": nt_matmul(k, n, dtype)}), target)
            fn = tvm.tirx.build(mod, target=target)["main"]
            a = rng.standard_normal((1, m, k), dtype=np.float32)
            w = rng.standard_normal((n, k), dtype=np.float32).astype(dtype)
            c = np.empty((1, m, n), np.float32)
            args = [
                tvm.runtime.tensor(a, dev),
                tvm.runtime.tensor(w, dev),
                tvm.runtime.tensor(c, dev),
            ]
            fn(*args)
            ref = a[0] @ w.astype(np.float32).T
            np.testing.assert_allclose(
                args[2].numpy()[0], ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max()
            )
            out[(name, dtype)] = lambda fn=fn, args=args: fn(*args)
    return out


def _openblas_core() -> str:
    """The OpenBLAS kernel numpy runs (core name), or 'unknown'."""
    import ctypes

    with open("/proc/self/maps") as maps:
        libs = {
            line.split()[-1]
            for line in maps
            if "openblas" in line.lower() and line.strip().endswith(".so")
        }
    for lib in libs:
        handle = ctypes.CDLL(lib)
        for symbol in (
            "scipy_openblas_get_corename64_",
            "openblas_get_corename64_",
            "openblas_get_corename",
        ):
            if hasattr(handle, symbol):
                fn = getattr(handle, symbol)
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return "unknown"


def numpy_unpinned(quick: bool, rounds: int) -> tuple[dict[str, float], str]:
    """numpy times in a child process without the OpenBLAS core pinning."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    }
    args = [sys.executable, __file__, "--numpy-child", "--rounds", str(rounds)] + (
        ["--quick"] if quick else []
    )
    result = json.loads(
        subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    )
    return result["times"], result["core"]


def memory_bandwidth() -> float:
    """GB/s of a 512 MiB numpy copy, read plus write bytes."""
    src = np.ones(128 * 1024 * 1024, dtype=np.float32)
    dst = np.empty_like(src)
    return 2 * src.nbytes / _best(lambda: np.copyto(dst, src), seconds=1.0) / 1e9


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 1 GB lm_head GEMV")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved timing rounds (best kept)"
    )
    parser.add_argument("--numpy-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.numpy_child:
        times = measure(numpy_kernels(args.quick), args.rounds)
        print(json.dumps({"times": times, "core": _openblas_core()}))
        return

    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count()))
    load_before = os.getloadavg()[0]
    bandwidth = memory_bandwidth()
    kernels = {("tvm",) + key: fn for key, fn in tvm_kernels(args.quick).items()}
    kernels.update({("torch",) + key: fn for key, fn in torch_kernels(args.quick).items()})
    kernels.update({("numpy", name): fn for name, fn in numpy_kernels(args.quick).items()})
    times = measure(kernels, args.rounds)
    pinned_core = _openblas_core()
    np_free, free_core = numpy_unpinned(args.quick, args.rounds)

    print(
        f"{os.cpu_count()} CPUs, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, "
        f"load average before the run {load_before:.2f}, after {os.getloadavg()[0]:.2f}; "
        f"memory copy bandwidth {bandwidth:.1f} GB/s (read + write); best of {args.rounds} rounds"
    )
    print(
        f"numpy OpenBLAS core: '{pinned_core}' with "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '<unset>')}, "
        f"'{free_core}' with it unset (numpy columns: pinned / unset; numpy is fp32 in both rows)"
    )
    header = (
        f"{'case':<16} {'W':<4} {'M':>4} {'K':>5} {'N':>6} | {'TVM ms':>8} {'GFLOP/s':>8} {'GB/s':>6} | "
        f"{'numpy ms':>15} | {'torch ms':>8} | {'TVM/np':>6} {'TVM/torch':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, m, k, n in _cases(args.quick):
        np_pinned = times[("numpy", name)]
        best_np = min(np_pinned, np_free[name])
        for dtype in DTYPES:
            t, t_torch = times[("tvm", name, dtype)], times[("torch", name, dtype)]
            gbps = n * k * np.dtype(dtype).itemsize / t / 1e9
            print(
                f"{name:<16} {'f32' if dtype == 'float32' else 'f16':<4} {m:>4} {k:>5} {n:>6} | "
                f"{t * 1e3:>8.3f} {2 * m * n * k / t / 1e9:>8.1f} {gbps:>6.1f} | "
                f"{np_pinned * 1e3:>7.3f}/{np_free[name] * 1e3:<7.3f} | {t_torch * 1e3:>8.3f} | "
                f"{best_np / t:>6.2f} {t_torch / t:>9.2f}"
            )
    print("ratios > 1: TVM faster (TVM/np against the faster numpy run)")


if __name__ == "__main__":
    main()
