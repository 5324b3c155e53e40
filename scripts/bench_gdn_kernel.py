"""Time the Gated DeltaNet CPU kernels against transformers' torch reference.

Shapes are the real ones: 0.8B (Hk = Hv = 16, Dk = Dv = 128, conv channels
6144) and 4B (Hk = 16, Hv = 32, conv channels 8192); prefill is B = 1, T = 512,
decode B = 1, T = 1.  The gated delta rule is compared with
``torch_chunk_gated_delta_rule`` for prefill and
``torch_recurrent_gated_delta_rule`` for decode, the conv with
``causal_conv1d_update``.  Each kernel runs through an exported ``nn.Module``
on the Relax VM, as in the model.  Times are the minimum over repeats, in ms;
``speedup`` is torch time / TVM time.  Both sides use the same number of
threads (all cores unless ``--threads``).

    python scripts/bench_gdn_kernel.py [--target '{"kind": "llvm"}'] [--threads 1]

The default target is the build machine's CPU (``mcpu`` from LLVM's host CPU
name; TVM 0.27's wheel rejects ``mcpu=native`` and falls back to generic x86-64).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Callable

import numpy as np
import torch
import tvm
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf
from tvm import relax
from tvm.relax.frontend import nn

from qwen35_mobile.compile.kernels import block_cols_for_target, causal_conv1d, gated_delta_rule

SHAPES = {"0.8B": (16, 16, 128, 128), "4B": (16, 32, 128, 128)}  # Hk, Hv, Dk, Dv
CONV_KERNEL = 4
PREFILL, DECODE = 512, 1


class _GatedDeltaRule(nn.Module):
    def __init__(self, block_cols: int):
        self.block_cols = block_cols

    def forward(self, q, k, v, g, beta, state):
        return gated_delta_rule(q, k, v, g, beta, state, block_cols=self.block_cols)


class _CausalConv(nn.Module):
    def forward(self, x, conv_state, weight):
        return causal_conv1d(x, conv_state, weight)


def _vm(module: nn.Module, spec: dict, target: tvm.target.Target) -> relax.VirtualMachine:
    mod, _ = module.export_tvm(spec={"forward": spec})
    return relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())


def _time_tvm(vm: relax.VirtualMachine, arrays: list[np.ndarray], repeat: int) -> float:
    """Best time of ``number=3`` back-to-back calls, in ms."""
    args = [tvm.runtime.tensor(a) for a in arrays]
    timer = vm.time_evaluator("forward", tvm.cpu(), number=3, repeat=repeat)
    return min(timer(*args).results) * 1e3


def _time_torch(fn: Callable, repeat: int) -> float:
    """Best time of one call after a warm-up, in ms."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _gdn_arrays(seq_len: int, hk: int, hv: int, dk: int, dv: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, seq_len, hk, dk)).astype(np.float32)
    k = rng.standard_normal((1, seq_len, hk, dk)).astype(np.float32)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((1, seq_len, hv, dv)).astype(np.float32)
    g = -rng.uniform(0.01, 1.0, (1, seq_len, hv)).astype(np.float32)
    beta = rng.uniform(0.05, 0.95, (1, seq_len, hv)).astype(np.float32)
    state = (0.3 * rng.standard_normal((1, hv, dk, dv))).astype(np.float32)
    return [q, k, v, g, beta, state]


def gated_delta_rule_cases(
    name: str, target: tvm.target.Target
) -> list[tuple[str, Callable, Callable]]:
    """(case, tvm timer, torch timer) for prefill and decode."""
    hk, hv, dk, dv = SHAPES[name]
    spec = {
        "q": nn.spec.Tensor(["b", "t", hk, dk], "float32"),
        "k": nn.spec.Tensor(["b", "t", hk, dk], "float32"),
        "v": nn.spec.Tensor(["b", "t", hv, dv], "float32"),
        "g": nn.spec.Tensor(["b", "t", hv], "float32"),
        "beta": nn.spec.Tensor(["b", "t", hv], "float32"),
        "state": nn.spec.Tensor(["b", hv, dk, dv], "float32"),
    }
    vm = _vm(_GatedDeltaRule(block_cols_for_target(target)), spec, target)
    cases = []
    for label, seq_len, reference in (
        ("prefill", PREFILL, hf.torch_chunk_gated_delta_rule),
        ("decode", DECODE, hf.torch_recurrent_gated_delta_rule),
    ):
        q, k, v, g, beta, state = _gdn_arrays(seq_len, hk, hv, dk, dv)
        torch_args = [torch.from_numpy(a) for a in (q, k, v, g, beta)]
        cases.append(
            (
                f"{name} gated_delta_rule {label} T={seq_len}",
                functools.partial(_time_tvm, vm, [q * np.float32(dk**-0.5), k, v, g, beta, state]),
                functools.partial(
                    _time_torch,
                    functools.partial(
                        reference,
                        *torch_args,
                        initial_state=torch.from_numpy(state),
                        output_final_state=True,
                    ),
                ),
            )
        )
    return cases


def causal_conv_cases(name: str, target: tvm.target.Target) -> list[tuple[str, Callable, Callable]]:
    """(case, tvm timer, torch timer) for prefill and decode."""
    hk, hv, dk, dv = SHAPES[name]
    channels = 2 * hk * dk + hv * dv
    spec = {
        "x": nn.spec.Tensor(["b", "t", channels], "float32"),
        "conv_state": nn.spec.Tensor(["b", channels, CONV_KERNEL - 1], "float32"),
        "weight": nn.spec.Tensor([channels, CONV_KERNEL], "float32"),
    }
    vm = _vm(_CausalConv(), spec, target)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((channels, CONV_KERNEL)).astype(np.float32)
    cases = []
    for label, seq_len in (("prefill", PREFILL), ("decode", DECODE)):
        x = rng.standard_normal((1, seq_len, channels)).astype(np.float32)
        state = rng.standard_normal((1, channels, CONV_KERNEL - 1)).astype(np.float32)
        torch_args = (
            torch.from_numpy(x).transpose(1, 2),
            torch.from_numpy(state),
            torch.from_numpy(weight),
        )
        cases.append(
            (
                f"{name} causal_conv1d C={channels} {label} T={seq_len}",
                functools.partial(_time_tvm, vm, [x, state, weight]),
                functools.partial(
                    _time_torch,
                    functools.partial(hf.causal_conv1d_update, *torch_args, None, "silu"),
                ),
            )
        )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target", type=json.loads, default=None, help="TVM target as JSON (default: host CPU)"
    )
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument(
        "--threads", type=int, default=None, help="threads for both sides (default: all cores)"
    )
    args = parser.parse_args()
    if args.threads:
        # Read by TVM's thread pool when it starts, at the first parallel kernel.
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    target_spec = args.target or {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
    target = tvm.target.Target(target_spec)
    print(
        f"target {json.dumps(target_spec)}, block_cols {block_cols_for_target(target)}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"{'case':<50} {'tvm ms':>9} {'torch ms':>9} {'speedup':>8}")
    cases = [
        c
        for name in SHAPES
        for c in gated_delta_rule_cases(name, target) + causal_conv_cases(name, target)
    ]
    # All torch timings first: TVM's worker threads keep spinning for a while
    # after a parallel call and would steal the cores from torch's threads.
    theirs = [time_torch(args.repeat) for _, _, time_torch in cases]
    ours = [time_tvm(args.repeat) for _, time_tvm, _ in cases]
    for (case, _, _), t_ours, t_theirs in zip(cases, ours, theirs):
        print(f"{case:<50} {t_ours:9.3f} {t_theirs:9.3f} {t_theirs / t_ours:7.1f}x")


if __name__ == "__main__":
    main()
