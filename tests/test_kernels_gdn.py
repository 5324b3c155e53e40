"""Parity of the Gated DeltaNet TIR kernels with transformers' torch reference.

Each kernel is wrapped in a one-op ``nn.Module``, exported with symbolic batch
and sequence length, compiled for ``{"kind": "llvm"}`` and run on the Relax VM;
one compiled module serves every (B, T) of a shape family.

Tolerances: fp32 agrees to 1e-5 of the largest output magnitude.  With float16
inputs the kernel reads the fp16 values and computes in fp32, while the
reference rounds its output to fp16 and scales q in fp32 where the kernel
receives q already scaled and rounded to fp16; both add ~2^-11 relative error,
so the fp16 tolerance is 2e-3.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm
from conftest import need_module  # noqa: E402
from tvm import relax
from tvm.relax.frontend import nn

from qwen35_mobile.compile.kernels import block_cols_for_target, causal_conv1d, gated_delta_rule

torch = need_module("torch")
from deltanet_reference import assert_close, conv_inputs, gdn_inputs, gdn_reference  # noqa: E402

hf = need_module("transformers.models.qwen3_5.modeling_qwen3_5")

TARGET = tvm.target.Target({"kind": "llvm"})
FP32_TOL = 1e-5
FP16_TOL = 2e-3


def _compile(module: nn.Module, spec: dict) -> relax.VirtualMachine:
    mod, _ = module.export_tvm(spec={"forward": spec})
    return relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())


def _run(vm: relax.VirtualMachine, *arrays: np.ndarray) -> list[np.ndarray]:
    outs = vm["forward"](*[tvm.runtime.tensor(a) for a in arrays])
    return [o.numpy() for o in outs]


# ---------------------------------------------------------------- gated delta rule


class _GatedDeltaRule(nn.Module):
    def __init__(self, block_cols: int | None):
        self.block_cols = block_cols

    def forward(self, q, k, v, g, beta, state):
        return gated_delta_rule(q, k, v, g, beta, state, block_cols=self.block_cols)


@functools.cache
def _gdn_vm(
    hk: int, hv: int, dk: int, dv: int, dtype: str, block_cols: int | None
) -> relax.VirtualMachine:
    spec = {
        "q": nn.spec.Tensor(["b", "t", hk, dk], dtype),
        "k": nn.spec.Tensor(["b", "t", hk, dk], dtype),
        "v": nn.spec.Tensor(["b", "t", hv, dv], dtype),
        "g": nn.spec.Tensor(["b", "t", hv], "float32"),
        "beta": nn.spec.Tensor(["b", "t", hv], "float32"),
        "state": nn.spec.Tensor(["b", hv, dk, dv], "float32"),
    }
    return _compile(_GatedDeltaRule(block_cols), spec)


def _gdn_kernel(
    x: dict[str, np.ndarray], dtype: str, block_cols: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    _, _, hk, dk = x["q"].shape
    hv, dv = x["v"].shape[2:]
    vm = _gdn_vm(hk, hv, dk, dv, dtype, block_cols)
    q = (x["q"] * np.float32(dk**-0.5)).astype(dtype)
    o, new_state = _run(
        vm, q, x["k"].astype(dtype), x["v"].astype(dtype), x["g"], x["beta"], x["state"]
    )
    assert o.dtype == np.float32 and new_state.dtype == np.float32
    return o, new_state


GDN_HEADS = [pytest.param(2, 2, id="hv=hk"), pytest.param(2, 4, id="hv=2hk")]
GDN_BATCH_LEN = [(1, 1), (1, 5), (1, 64), (1, 130), (3, 1), (2, 7)]


@pytest.mark.parametrize("hk,hv", GDN_HEADS)
@pytest.mark.parametrize("b,t", GDN_BATCH_LEN)
@pytest.mark.parametrize("chunked", [False, True], ids=["recurrent", "chunked"])
def test_gated_delta_rule_fp32(hk, hv, b, t, chunked):
    x = gdn_inputs(b, t, hk, hv, 128, 128, seed=t * 10 + b)
    o, new_state = _gdn_kernel(x, "float32")
    ref_o, ref_state = gdn_reference(x, "float32", chunked)
    assert_close(o, ref_o, FP32_TOL)
    assert_close(new_state, ref_state, FP32_TOL)


@pytest.mark.parametrize("block_cols", [16, 64])
def test_gated_delta_rule_block_cols(block_cols):
    """Other column blocks and head dims (Dk != Dv) give the same result."""
    x = gdn_inputs(2, 9, 1, 2, 32, 64, seed=block_cols)
    o, new_state = _gdn_kernel(x, "float32", block_cols)
    ref_o, ref_state = gdn_reference(x, "float32", chunked=False)
    assert_close(o, ref_o, FP32_TOL)
    assert_close(new_state, ref_state, FP32_TOL)


@pytest.mark.parametrize("b,t", [(1, 1), (3, 1), (1, 64), (1, 130)])
def test_gated_delta_rule_fp16(b, t):
    x = gdn_inputs(b, t, 2, 4, 128, 128, seed=100 + t)
    for name in ("q", "k", "v"):  # the values both sides see
        x[name] = x[name].astype(np.float16).astype(np.float32)
    o, new_state = _gdn_kernel(x, "float16")
    ref_o, ref_state = gdn_reference(x, "float16", chunked=t > 1)
    assert_close(o, ref_o, FP16_TOL)
    assert_close(new_state, ref_state, FP16_TOL)


def test_gated_delta_rule_continues_across_calls():
    """Prefill in pieces (then decode) equals one pass over the whole sequence."""
    x = gdn_inputs(1, 70, 2, 4, 128, 128, seed=7)
    whole_o, whole_state = _gdn_kernel(x, "float32")
    pieces, state = [], x["state"]
    for lo, hi in ((0, 33), (33, 69), (69, 70)):
        part = {n: a[:, lo:hi] for n, a in x.items() if n != "state"}
        o, state = _gdn_kernel({**part, "state": state}, "float32")
        pieces.append(o)
    assert_close(np.concatenate(pieces, axis=1), whole_o, FP32_TOL)
    assert_close(state, whole_state, FP32_TOL)


@pytest.mark.parametrize(
    "target,block_cols",
    [
        ({"kind": "llvm", "mcpu": "znver4"}, 64),
        ({"kind": "llvm", "mcpu": "haswell"}, 32),
        ({"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]}, 32),
        ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}, 16),
        (None, 32),
    ],
)
def test_block_cols_for_target(target, block_cols):
    assert block_cols_for_target(target and tvm.target.Target(target)) == block_cols


# ---------------------------------------------------------------- causal conv1d


class _CausalConv(nn.Module):
    def forward(self, x, conv_state, weight):
        return causal_conv1d(x, conv_state, weight)


@functools.cache
def _conv_vm(
    channels: int, kernel: int, dtype: str, weight_shape: tuple[int, ...]
) -> relax.VirtualMachine:
    spec = {
        "x": nn.spec.Tensor(["b", "t", channels], dtype),
        "conv_state": nn.spec.Tensor(["b", channels, kernel - 1], dtype),
        "weight": nn.spec.Tensor(list(weight_shape), dtype),
    }
    return _compile(_CausalConv(), spec)


def _conv_kernel(
    x: np.ndarray, state: np.ndarray, weight: np.ndarray, hf_layout: bool
) -> tuple[np.ndarray, np.ndarray]:
    """weight [C, K]; passed as [C, 1, K] when ``hf_layout``."""
    channels, kernel = weight.shape
    if hf_layout:
        weight = weight[:, None, :]
    vm = _conv_vm(channels, kernel, str(x.dtype), weight.shape)
    y, new_state = _run(vm, x, state, weight)
    assert y.dtype == x.dtype and new_state.dtype == x.dtype
    return y, new_state


def _conv_update_reference(
    x: np.ndarray, state: np.ndarray, weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """transformers' causal_conv1d_update in fp32; it updates the state in place."""
    state_t = torch.from_numpy(state.astype(np.float32))
    x_t = torch.from_numpy(x.astype(np.float32)).transpose(1, 2)
    y = hf.causal_conv1d_update(
        x_t, state_t, torch.from_numpy(weight.astype(np.float32)), None, "silu"
    )
    return y.transpose(1, 2).numpy(), state_t.numpy()


@pytest.mark.parametrize("channels,hf_layout", [(64, True), (40, False)])
@pytest.mark.parametrize("b,t", [(1, 1), (3, 1), (1, 2), (2, 7), (1, 130)])
def test_causal_conv1d_update(channels, hf_layout, b, t):
    x, state, weight = conv_inputs(b, t, channels, 4, seed=t * 10 + b)
    y, new_state = _conv_kernel(x, state, weight, hf_layout)
    ref_y, ref_state = _conv_update_reference(x, state, weight)
    assert_close(y, ref_y, FP32_TOL)
    np.testing.assert_array_equal(new_state, ref_state)


@pytest.mark.parametrize("t", [1, 2, 9])
def test_causal_conv1d_fresh_sequence(t):
    """A zero state reproduces causal_conv1d_fn (the prefill path)."""
    x, _, weight = conv_inputs(2, t, 64, 4, seed=t)
    y, _ = _conv_kernel(x, np.zeros((2, 64, 3), np.float32), weight, hf_layout=True)
    ref = hf.causal_conv1d_fn(
        torch.from_numpy(x).transpose(1, 2), torch.from_numpy(weight), None, activation="silu"
    )
    assert_close(y, ref.transpose(1, 2).numpy(), FP32_TOL)


def test_causal_conv1d_continues_across_calls():
    """Calls of 2 (< K - 1), 1 and 6 tokens equal one causal_conv1d_fn pass."""
    x, _, weight = conv_inputs(2, 9, 64, 4, seed=3)
    pieces, state = [], np.zeros((2, 64, 3), np.float32)
    for lo, hi in ((0, 2), (2, 3), (3, 9)):
        y, state = _conv_kernel(np.ascontiguousarray(x[:, lo:hi]), state, weight, hf_layout=True)
        pieces.append(y)
    ref = hf.causal_conv1d_fn(
        torch.from_numpy(x).transpose(1, 2), torch.from_numpy(weight), None, activation="silu"
    )
    assert_close(np.concatenate(pieces, axis=1), ref.transpose(1, 2).numpy(), FP32_TOL)
    np.testing.assert_array_equal(state, x[:, -3:].transpose(0, 2, 1))


@pytest.mark.parametrize("b,t", [(1, 1), (1, 2), (2, 7)])
def test_causal_conv1d_fp16(b, t):
    x, state, weight = conv_inputs(b, t, 64, 4, seed=50 + t)
    x, state, weight = (a.astype(np.float16) for a in (x, state, weight))
    y, new_state = _conv_kernel(x, state, weight, hf_layout=True)
    ref_y, ref_state = _conv_update_reference(x, state, weight)
    assert_close(y, ref_y, FP16_TOL)
    np.testing.assert_array_equal(new_state, ref_state.astype(np.float16))
