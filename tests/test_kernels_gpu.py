"""The GPU Gated DeltaNet kernels: device code generation and CPU-emulated parity.

No GPU runtime exists on these machines, so each kernel is checked twice:

* **builds**: a one-op ``nn.Module`` is compiled with ``tvm.compile`` for cuda
  (sm_80), opencl, metal and webgpu, and the device source must be generated
  (``inspect_source``) with every kernel in it and at most 256 threads per block;
* **numbers**: the *same kernel builder* is instantiated with ``emulate=True``
  (thread bindings become serial loops, ``local`` scratch becomes ``global``),
  compiled for llvm and compared with transformers' torch reference
  (``torch_recurrent_gated_delta_rule``, ``torch_chunk_gated_delta_rule``,
  ``causal_conv1d_update`` / ``causal_conv1d_fn``).  Tolerances as in
  test_kernels_gdn.py: fp32 1e-5, fp16 2e-3 of the largest output magnitude.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import tvm
from conftest import need_module, need_tool  # noqa: E402
from tvm import relax
from tvm.relax.frontend import nn

from qwen35_mobile.compile.kernels.gpu_causal_conv import causal_conv1d
from qwen35_mobile.compile.kernels.gpu_gated_delta_rule import (
    gated_delta_rule,
    max_threads_for_target,
)

torch = need_module("torch")
from deltanet_reference import assert_close, conv_inputs, gdn_inputs, gdn_reference  # noqa: E402

hf = need_module("transformers.models.qwen3_5.modeling_qwen3_5")

CPU = tvm.target.Target({"kind": "llvm"})
FP32_TOL = 1e-5
FP16_TOL = 2e-3

GPU_TARGETS = {
    "cuda": lambda: tvm.target.Target({"kind": "cuda", "arch": "sm_80"}),
    "opencl": lambda: tvm.target.Target({"kind": "opencl"}, host={"kind": "llvm"}),
    "metal": lambda: tvm.target.Target(
        {"kind": "metal"}, host={"kind": "llvm", "mtriple": "arm64-apple-darwin"}
    ),
    "webgpu": lambda: tvm.target.Target(
        {"kind": "webgpu"}, host={"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}
    ),
}


def _run(vm: relax.VirtualMachine, *arrays: np.ndarray) -> list[np.ndarray]:
    outs = vm["forward"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays])
    return [o.numpy() for o in outs]


# ---------------------------------------------------------------- modules


class _GatedDeltaRule(nn.Module):
    def __init__(self, chunked: bool | None, max_threads: int | None, emulate: bool, target=None):
        self.chunked, self.max_threads, self.emulate = chunked, max_threads, emulate
        self.target = target

    def forward(self, q, k, v, g, beta, state):
        return gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            state,
            chunked=self.chunked,
            target=self.target,
            max_threads=self.max_threads,
            emulate=self.emulate,
        )


def _gdn_spec(hk: int, hv: int, dk: int, dv: int, dtype: str, seq_len="t") -> dict:
    return {
        "q": nn.spec.Tensor(["b", seq_len, hk, dk], dtype),
        "k": nn.spec.Tensor(["b", seq_len, hk, dk], dtype),
        "v": nn.spec.Tensor(["b", seq_len, hv, dv], dtype),
        "g": nn.spec.Tensor(["b", seq_len, hv], "float32"),
        "beta": nn.spec.Tensor(["b", seq_len, hv], "float32"),
        "state": nn.spec.Tensor(["b", hv, dk, dv], "float32"),
    }


class _CausalConv(nn.Module):
    def __init__(self, max_threads: int | None, emulate: bool, target=None):
        self.max_threads, self.emulate, self.target = max_threads, emulate, target

    def forward(self, x, conv_state, weight):
        return causal_conv1d(
            x,
            conv_state,
            weight,
            target=self.target,
            max_threads=self.max_threads,
            emulate=self.emulate,
        )


def _conv_spec(channels: int, kernel: int, dtype: str, weight_shape: tuple[int, ...]) -> dict:
    return {
        "x": nn.spec.Tensor(["b", "t", channels], dtype),
        "conv_state": nn.spec.Tensor(["b", channels, kernel - 1], dtype),
        "weight": nn.spec.Tensor(list(weight_shape), dtype),
    }


# ---------------------------------------------------------------- device builds


def _device_sources(module: nn.Module, spec: dict, target: tvm.target.Target) -> str:
    """The device source of ``module`` (built with ``target``: the kernels size
    their blocks by the target they are given, never by the current one)."""
    assert module.target is target
    mod, _ = module.export_tvm(spec={"forward": spec})
    ex = tvm.compile(mod, target=target)
    found = []

    def walk(m):
        if m.kind == target.kind.name:
            found.append(m.inspect_source())
        for sub in m.imports:
            walk(sub)

    walk(ex.mod)
    assert found, f"no {target.kind.name} module in the executable"
    return "\n".join(found)


def _threads_per_block(source: str, kind: str) -> dict[str, int]:
    """Threads per block of each of our kernels (not TVM's own, e.g. a reshape), from the source."""
    if kind == "cuda":
        found = {
            name: int(n) for n, name in re.findall(r"__launch_bounds__\((\d+)\) (\w+)\(", source)
        }
    elif kind == "webgpu":
        found = {
            name: int(x) * int(y) * int(z)
            for x, y, z, name in re.findall(
                r"@workgroup_size\((\d+), (\d+), (\d+)\)\s*fn (\w+)\(", source
            )
        }
    else:
        return {}  # opencl / metal sources carry no launch sizes
    return {
        name: n
        for name, n in found.items()
        if name.startswith(("gated_delta_rule", "causal_conv1d"))
    }


@pytest.mark.parametrize("kind", list(GPU_TARGETS))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_kernels_build(kind, dtype):
    """Both kernels (recurrent-only, and chunked with the run-time switch) give device source."""
    target = GPU_TARGETS[kind]()
    kernels = {
        "gated_delta_rule_kernel": (
            _GatedDeltaRule(False, None, False, target),
            _gdn_spec(2, 4, 128, 128, dtype, 1),
        ),
        "gated_delta_rule_chunk_prep_kernel": (
            _GatedDeltaRule(None, None, False, target),
            _gdn_spec(2, 4, 128, 128, dtype),
        ),
        "causal_conv1d_kernel": (
            _CausalConv(None, False, target),
            _conv_spec(768, 4, dtype, (768, 1, 4)),
        ),
    }
    for name, (module, spec) in kernels.items():
        source = _device_sources(module, spec, target)
        assert name in source
        if name.endswith("chunk_prep_kernel"):
            for other in ("chunk_solve_kernel", "chunk_scan_kernel"):
                assert f"gated_delta_rule_{other}" in source
        threads = _threads_per_block(source, kind)
        if kind in ("cuda", "webgpu"):
            assert threads and all(0 < n <= 256 for n in threads.values()), threads
        assert "unroll 64" not in source and "unroll(64)" not in source


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_webgpu_kernels_bind_at_most_10_storage_buffers(dtype):
    """TVM's web runtime asks the adapter for 10 storage buffers per shader stage."""
    from qwen35_mobile.parity.static_checks import WEBGPU_MAX_STORAGE_BUFFERS, wgsl_storage_buffers

    target = GPU_TARGETS["webgpu"]()
    module, spec = _GatedDeltaRule(None, None, False, target), _gdn_spec(2, 4, 128, 128, dtype)
    source = _device_sources(module, spec, target)
    counts = {
        n: c for n, c in wgsl_storage_buffers(source).items() if n.startswith("gated_delta_rule")
    }
    assert set(counts) == {
        f"gated_delta_rule_chunk_{k}_kernel" for k in ("prep", "solve", "scan")
    }, counts
    assert WEBGPU_MAX_STORAGE_BUFFERS == 10
    assert max(counts.values()) <= 10, counts
    assert (
        counts["gated_delta_rule_chunk_scan_kernel"] == 10
    )  # q k v g beta state qk uw o new_state


def test_max_threads_for_target():
    assert max_threads_for_target(GPU_TARGETS["cuda"]()) == 256  # cuda allows 1024; capped
    assert max_threads_for_target(GPU_TARGETS["opencl"]()) == 256
    assert (
        max_threads_for_target(
            tvm.target.Target({"kind": "cuda", "arch": "sm_80", "max_num_threads": 128})
        )
        == 128
    )
    assert max_threads_for_target(None) == 256


def test_threads_follow_target():
    """A target allowing 64 threads per block gets kernels of at most 64 threads."""
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80", "max_num_threads": 64})
    gdn, conv = _GatedDeltaRule(None, None, False, target), _CausalConv(None, False, target)
    source = _device_sources(gdn, _gdn_spec(2, 4, 128, 128, "float32"), target)
    source += _device_sources(conv, _conv_spec(768, 4, "float32", (768, 4)), target)
    threads = _threads_per_block(source, "cuda")
    assert len(threads) == 4 and max(threads.values()) == 64, threads


# ---------------------------------------------------------------- gated delta rule on the CPU


@functools.cache
def _gdn_vm(hk, hv, dk, dv, dtype, chunked, max_threads) -> relax.VirtualMachine:
    mod, _ = _GatedDeltaRule(chunked, max_threads, True).export_tvm(
        spec={"forward": _gdn_spec(hk, hv, dk, dv, dtype)}
    )
    return relax.VirtualMachine(tvm.compile(mod, target=CPU), tvm.cpu())


def _gdn_kernel(x, dtype, chunked, max_threads=None) -> tuple[np.ndarray, np.ndarray]:
    _, _, hk, dk = x["q"].shape
    hv, dv = x["v"].shape[2:]
    vm = _gdn_vm(hk, hv, dk, dv, dtype, chunked, max_threads)
    q = (x["q"] * np.float32(dk**-0.5)).astype(dtype)
    o, new_state = _run(
        vm, q, x["k"].astype(dtype), x["v"].astype(dtype), x["g"], x["beta"], x["state"]
    )
    assert o.dtype == np.float32 and new_state.dtype == np.float32
    return o, new_state


GDN_HEADS = [pytest.param(2, 2, id="hv=hk"), pytest.param(2, 4, id="hv=2hk")]
GDN_BATCH_LEN = [(1, 1), (1, 5), (1, 64), (1, 130), (3, 1), (3, 5), (3, 130)]
# kernel mode -> the reference it is held to
GDN_MODES = [
    pytest.param(False, False, id="recurrent"),
    pytest.param(True, True, id="chunked"),
    pytest.param(
        None, True, id="auto"
    ),  # run-time switch: recurrent below 64 tokens, chunked from 64
]


@pytest.mark.parametrize("hk,hv", GDN_HEADS)
@pytest.mark.parametrize("b,t", GDN_BATCH_LEN)
@pytest.mark.parametrize("chunked,chunked_reference", GDN_MODES)
def test_gpu_gated_delta_rule_fp32(hk, hv, b, t, chunked, chunked_reference):
    x = gdn_inputs(b, t, hk, hv, 128, 128, seed=t * 10 + b)
    o, new_state = _gdn_kernel(x, "float32", chunked)
    ref_o, ref_state = gdn_reference(x, "float32", chunked_reference)
    assert_close(o, ref_o, FP32_TOL)
    assert_close(new_state, ref_state, FP32_TOL)


@pytest.mark.parametrize("chunked", [False, True], ids=["recurrent", "chunked"])
def test_gpu_gated_delta_rule_column_blocks(chunked):
    """Dk != Dv, and few threads per block (several column blocks per head, solve columns split)."""
    x = gdn_inputs(2, 70, 1, 2, 32, 64, seed=11)
    o, new_state = _gdn_kernel(x, "float32", chunked, max_threads=16)
    ref_o, ref_state = gdn_reference(x, "float32", chunked)
    assert_close(o, ref_o, FP32_TOL)
    assert_close(new_state, ref_state, FP32_TOL)


@pytest.mark.parametrize("chunked", [False, True], ids=["recurrent", "chunked"])
def test_gpu_gated_delta_rule_fp16(chunked):
    x = gdn_inputs(2, 70, 2, 4, 128, 128, seed=170)
    for name in ("q", "k", "v"):  # the values both sides see
        x[name] = x[name].astype(np.float16).astype(np.float32)
    o, new_state = _gdn_kernel(x, "float16", chunked)
    ref_o, ref_state = gdn_reference(x, "float16", chunked)
    assert_close(o, ref_o, FP16_TOL)
    assert_close(new_state, ref_state, FP16_TOL)


def test_gpu_gated_delta_rule_continues_across_calls():
    """Chunked prefill in pieces, then decode, equals one pass over the whole sequence."""
    x = gdn_inputs(1, 140, 2, 4, 128, 128, seed=7)
    whole_o, whole_state = _gdn_kernel(x, "float32", True)
    pieces, state = [], x["state"]
    for (lo, hi), chunked in (((0, 65), True), ((65, 139), None), ((139, 140), False)):
        part = {n: a[:, lo:hi] for n, a in x.items() if n != "state"}
        o, state = _gdn_kernel({**part, "state": state}, "float32", chunked)
        pieces.append(o)
    assert_close(np.concatenate(pieces, axis=1), whole_o, FP32_TOL)
    assert_close(state, whole_state, FP32_TOL)


# ---------------------------------------------------------------- causal conv1d on the CPU


@functools.cache
def _conv_vm(channels, kernel, dtype, weight_shape, max_threads) -> relax.VirtualMachine:
    mod, _ = _CausalConv(max_threads, True).export_tvm(
        spec={"forward": _conv_spec(channels, kernel, dtype, weight_shape)}
    )
    return relax.VirtualMachine(tvm.compile(mod, target=CPU), tvm.cpu())


def _conv_kernel(x, state, weight, hf_layout, max_threads=None):
    channels, kernel = weight.shape
    if hf_layout:
        weight = weight[:, None, :]
    vm = _conv_vm(channels, kernel, str(x.dtype), weight.shape, max_threads)
    y, new_state = _run(vm, x, state, weight)
    assert y.dtype == x.dtype and new_state.dtype == x.dtype
    return y, new_state


def _conv_update_reference(x, state, weight):
    """transformers' causal_conv1d_update in fp32; it updates the state in place."""
    state_t = torch.from_numpy(state.astype(np.float32))
    x_t = torch.from_numpy(x.astype(np.float32)).transpose(1, 2)
    y = hf.causal_conv1d_update(
        x_t, state_t, torch.from_numpy(weight.astype(np.float32)), None, "silu"
    )
    return y.transpose(1, 2).numpy(), state_t.numpy()


@pytest.mark.parametrize(
    "channels,hf_layout,max_threads",
    [
        (64, True, None),
        (40, False, None),
        (40, True, 16),
    ],  # 40 over 16 threads: a partial last block
)
@pytest.mark.parametrize("b,t", [(1, 1), (3, 1), (1, 2), (3, 5), (1, 130)])
def test_gpu_causal_conv1d_update(channels, hf_layout, max_threads, b, t):
    x, state, weight = conv_inputs(b, t, channels, 4, seed=t * 10 + b)
    y, new_state = _conv_kernel(x, state, weight, hf_layout, max_threads)
    ref_y, ref_state = _conv_update_reference(x, state, weight)
    assert_close(y, ref_y, FP32_TOL)
    np.testing.assert_array_equal(new_state, ref_state)


def test_gpu_causal_conv1d_fresh_sequence_in_pieces():
    """A zero state, then calls of 2 (< K - 1), 1 and 64 tokens, equal one causal_conv1d_fn pass."""
    x, _, weight = conv_inputs(3, 67, 64, 4, seed=3)
    pieces, state = [], np.zeros((3, 64, 3), np.float32)
    for lo, hi in ((0, 2), (2, 3), (3, 67)):
        y, state = _conv_kernel(x[:, lo:hi], state, weight, hf_layout=True)
        pieces.append(y)
    ref = hf.causal_conv1d_fn(
        torch.from_numpy(x).transpose(1, 2), torch.from_numpy(weight), None, activation="silu"
    )
    assert_close(np.concatenate(pieces, axis=1), ref.transpose(1, 2).numpy(), FP32_TOL)
    np.testing.assert_array_equal(state, x[:, -3:].transpose(0, 2, 1))


def test_gpu_causal_conv1d_fp16():
    x, state, weight = conv_inputs(2, 7, 64, 4, seed=57)
    x, state, weight = (a.astype(np.float16) for a in (x, state, weight))
    y, new_state = _conv_kernel(x, state, weight, hf_layout=True)
    ref_y, ref_state = _conv_update_reference(x, state, weight)
    assert_close(y, ref_y, FP16_TOL)
    np.testing.assert_array_equal(new_state, ref_state.astype(np.float16))


# ---------------------------------------------------------------- real OpenCL execution (PoCL), where present


def _opencl_context():
    """A PoCL (or any) OpenCL context: pyopencl and an OpenCL driver are set-up
    tools (scripts/setup_static_checks.sh), so without them the test skips, or
    fails under CI=true; installed and broken, it fails."""
    from qwen35_mobile.parity.static_checks import opencl_devices

    cl, devices = need_tool(opencl_devices, "pyopencl with an OpenCL driver (PoCL)")
    ctx = cl.Context(devices[:1])
    return cl, ctx, cl.CommandQueue(ctx)


def _cl_launch(
    cl, ctx, queue, source: str, launches, arrays: dict[str, np.ndarray], scalars: dict[str, int]
):
    """Build ``source`` and run ``launches`` = [(kernel, (grid_x, grid_y), threads)] in order.

    Kernel arguments are bound by name as TVM emits them (``<Buffer>_ptr`` then the
    shape variables); ``arrays`` holds inputs and zero-initialised outputs and
    intermediates, and is updated with the results."""
    program = cl.Program(ctx, source).build()
    mf = cl.mem_flags
    buffers = {
        name: cl.Buffer(ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=a)
        for name, a in arrays.items()
    }
    for kernel, (gx, gy), threads in launches:
        params = re.search(rf"__kernel void {kernel}\(([^)]*)\)", source).group(1)
        args = []
        for param in params.split(","):
            name = param.split()[-1]
            if name.endswith("_ptr"):
                args.append(buffers[name[: -len("_ptr")]])
            else:
                args.append(np.int64(scalars[name]))
        getattr(program, kernel)(queue, (gx * threads, gy), (threads, 1), *args)
    queue.finish()
    for name, a in arrays.items():
        cl.enqueue_copy(queue, a, buffers[name])
    return arrays


OPENCL = GPU_TARGETS["opencl"]()


def _opencl_source(module: nn.Module, spec: dict) -> str:
    return _device_sources(module, spec, OPENCL)


@pytest.mark.parametrize("chunked", [False, True], ids=["recurrent", "chunked"])
def test_gpu_gated_delta_rule_on_opencl(chunked):
    """The generated OpenCL C, run with real concurrent work-items, matches transformers."""
    cl, ctx, queue = _opencl_context()
    from qwen35_mobile.compile.kernels.gpu_gated_delta_rule import CHUNK, _pow2_at_most

    b, t, hk, hv, dk, dv = 2, 130, 2, 4, 128, 128
    x = gdn_inputs(b, t, hk, hv, dk, dv, seed=5)
    module = _GatedDeltaRule(chunked, None, False, OPENCL)
    source = _opencl_source(module, _gdn_spec(hk, hv, dk, dv, "float32"))
    nc = (t + CHUNK - 1) // CHUNK
    f32 = np.float32
    arrays = {
        "Q": (x["q"] * f32(dk**-0.5)).astype(f32),
        "K": x["k"],
        "V": x["v"],
        "G": x["g"],
        "Beta": x["beta"],
        "S_in": x["state"],
        "O": np.zeros((b, t, hv, dv), f32),
        "S_out": np.zeros((b, hv, dk, dv), f32),
    }
    if chunked:
        arrays |= {
            "Gc": np.zeros((b, hv, nc, CHUNK), f32),
            "Lm": np.zeros((b, hv, nc, CHUNK, CHUNK), f32),
            "QK": np.zeros((b, hv, nc, CHUNK, CHUNK), f32),
            "UW": np.zeros((b, hv, nc, CHUNK, dv + dk), f32),
        }
        solve_threads = _pow2_at_most(dk + dv, 256)
        launches = [
            ("gated_delta_rule_chunk_prep_kernel", (nc, b * hv), CHUNK),
            (
                "gated_delta_rule_chunk_solve_kernel",
                (nc * -(-(dk + dv) // solve_threads), b * hv),
                solve_threads,
            ),
            ("gated_delta_rule_chunk_scan_kernel", (b * hv, 1), dv),
        ]
    else:
        launches = [("gated_delta_rule_kernel", (b * hv, 1), dv)]
    out = _cl_launch(cl, ctx, queue, source, launches, arrays, {"B": b, "L": t, "NC": nc})
    ref_o, ref_state = gdn_reference(x, "float32", chunked)
    assert_close(out["O"], ref_o, FP32_TOL)
    assert_close(out["S_out"], ref_state, FP32_TOL)


def test_gpu_causal_conv1d_on_opencl():
    cl, ctx, queue = _opencl_context()
    b, t, channels = 3, 9, 40
    x, state, weight = conv_inputs(b, t, channels, 4, seed=9)
    module = _CausalConv(16, False, OPENCL)
    source = _opencl_source(module, _conv_spec(channels, 4, "float32", (channels, 4)))
    arrays = {
        "X": x,
        "S_in": state,
        "W": weight,
        "Y": np.zeros_like(x),
        "S_out": np.zeros_like(state),
    }
    out = _cl_launch(
        cl, ctx, queue, source, [("causal_conv1d_kernel", (b * 3, 1), 16)], arrays, {"B": b, "L": t}
    )
    ref_y, ref_state = _conv_update_reference(x, state, weight)
    assert_close(out["Y"], ref_y, FP32_TOL)
    np.testing.assert_array_equal(out["S_out"], ref_state)
