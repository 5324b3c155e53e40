"""Causal depthwise conv1d + SiLU with a carried state, as a CPU-scheduled TIR kernel.

``xx = concat(conv_state^T, x)`` along time (``K - 1`` columns of left context
then the new tokens), ``y[b, t, c] = silu(sum_j weight[c, j] * xx[b, t + j, c])``
with the sum in fp32, and the new state is the last ``K - 1`` columns of ``xx``
(so a call with ``T < K - 1`` keeps part of the old state).  This is what
transformers' ``causal_conv1d_update`` computes, and ``causal_conv1d_fn`` with
a zero state.

One task per (sequence, block of channels): the task gathers its block of the
weight once, then walks the tokens with the channels vectorised.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T

from .checks import conv_dims

__all__ = ["causal_conv1d", "causal_conv1d_func"]

# Cephes' expf polynomial for exp(f), |f| <= ln(2) / 2 (relative error ~1e-7).
_EXP_POLY = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)


def _exp_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """exp(x) for float32 from arithmetic alone, so that it vectorises.

    LLVM scalarises a vector ``llvm.exp`` into one libm call per lane (7x
    slower here).  Here ``x = n ln2 + f`` with integer ``n``; ``exp(f)`` is a
    polynomial and ``2^n`` is built in the exponent bits.  Inputs are clamped to
    [-88.38, 88.38], where the result is 0 and inf respectively.
    """
    f32 = "float32"
    x = tirx.max(tirx.min(x, tirx.const(88.3762626647950, f32)), tirx.const(-88.3762626647949, f32))
    # n = floor(y) as trunc(y) - (trunc(y) > y): ``floor`` itself is a libm call
    # per lane on x86-64 without SSE4.1.
    y = x * tirx.const(1.44269504088896341, f32) + tirx.const(0.5, f32)
    trunc = tirx.Cast("int32", y)
    n = trunc - tirx.Cast("int32", tirx.Cast(f32, trunc) > y)
    f = x - tirx.Cast(f32, n) * tirx.const(0.6931471805599453, f32)
    poly = tirx.const(_EXP_POLY[0], f32)
    for coef in _EXP_POLY[1:]:
        poly = poly * f + tirx.const(coef, f32)
    exp_f = poly * f * f + f + tirx.const(1.0, f32)
    two_n = tirx.reinterpret(f32, tirx.shift_left(n + 127, 23))
    return two_n * exp_f


def _silu_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """x * sigmoid(x) with the vectorisable exp."""
    return x / (tirx.const(1.0, "float32") + _exp_f32(-x))


def _channel_block(channels: int) -> int:
    """The widest power of two up to 64 that divides ``channels``."""
    block = 64
    while channels % block:
        block //= 2
    return block


def causal_conv1d_func(
    channels: int, kernel_size: int, dtype: str, weight_dtype: str
) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc ``(x, conv_state, weight, y, new_state)``.

    Shapes, with symbolic batch ``B`` and sequence length ``L``: x and y
    ``[B, L, C]`` in ``dtype``; conv_state and new_state ``[B, C, K - 1]`` in
    ``dtype``; weight ``[C, K]`` in ``weight_dtype``.
    """
    if kernel_size < 2:
        raise ValueError(f"kernel_size must be at least 2, got {kernel_size}")
    C, K = channels, kernel_size
    ctx = K - 1  # columns of left context
    vc = _channel_block(C)
    f32 = "float32"

    # Scratch buffers use scope "global" so that they become stack allocas (see
    # gated_delta_rule.py).  Both arms of each select are clamped in bounds, as a
    # vectorised select may load both.
    @T.prim_func(private=True)
    def causal_conv1d_cpu(
        x_handle: T.handle,
        state_handle: T.handle,
        weight_handle: T.handle,
        y_handle: T.handle,
        new_state_handle: T.handle,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int64()
        L = T.int64()
        X = T.match_buffer(x_handle, (B, L, C), dtype)
        S_in = T.match_buffer(state_handle, (B, C, ctx), dtype)
        W = T.match_buffer(weight_handle, (C, K), weight_dtype)
        Y = T.match_buffer(y_handle, (B, L, C), dtype)
        S_out = T.match_buffer(new_state_handle, (B, C, ctx), dtype)
        for task in T.parallel(B * (C // vc)):
            w = T.alloc_buffer((K, vc), f32, scope="global")  # this block's taps, tap-major
            acc = T.alloc_buffer((vc,), f32, scope="global")
            b: T.let = task // (C // vc)
            c0: T.let = task % (C // vc) * vc
            for j in range(K):
                for c in T.vectorized(vc):
                    w[j, c] = T.Cast(f32, W[c0 + c, j])
            # the first K - 1 tokens read the state for some taps
            for t in range(T.min(L, ctx)):
                for c in T.vectorized(vc):
                    acc[c] = T.float32(0)
                for j in T.unroll(K):
                    # xx[b, t + j, c]: a state column while t + j < K - 1, else x[b, t + j - (K - 1), c]
                    for c in T.vectorized(vc):
                        acc[c] = acc[c] + w[j, c] * T.if_then_else(
                            t + j < ctx,
                            T.Cast(f32, S_in[b, c0 + c, T.min(t + j, ctx - 1)]),
                            T.Cast(f32, X[b, T.max(t + j - ctx, 0), c0 + c]),
                        )
                for c in T.vectorized(vc):
                    Y[b, t, c0 + c] = T.Cast(dtype, _silu_f32(acc[c]))
            # the rest read x only
            for t in range(ctx, T.max(L, ctx)):
                for c in T.vectorized(vc):
                    acc[c] = T.float32(0)
                for j in T.unroll(K):
                    for c in T.vectorized(vc):
                        acc[c] = acc[c] + w[j, c] * T.Cast(f32, X[b, t + j - ctx, c0 + c])
                for c in T.vectorized(vc):
                    Y[b, t, c0 + c] = T.Cast(dtype, _silu_f32(acc[c]))
            # new_state[:, :, j] = xx[:, L + j, :]
            for j in range(ctx):
                for c in T.vectorized(vc):
                    S_out[b, c0 + c, j] = T.if_then_else(
                        L + j < ctx,
                        S_in[b, c0 + c, T.min(L + j, ctx - 1)],
                        X[b, T.max(L + j - ctx, 0), c0 + c],
                    )

    return causal_conv1d_cpu


def causal_conv1d(
    x: Tensor, conv_state: Tensor, weight: Tensor, *, name: str = "causal_conv1d"
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv1d with SiLU over ``x``, continuing from ``conv_state``.

    Parameters
    ----------
    x : ``[B, T, C]``, model dtype.
    conv_state : ``[B, C, K - 1]``, model dtype: the last ``K - 1`` inputs of
        previous calls (zeros for a fresh sequence).
    weight : ``[C, K]`` or Hugging Face's ``conv1d.weight`` ``[C, 1, K]``
        (reshaped here), any float dtype; the sum is taken in fp32.

    Returns
    -------
    y : ``[B, T, C]``, model dtype.
    new_state : ``[B, C, K - 1]``, model dtype.
    """
    dims = conv_dims(x, conv_state, weight)
    func = causal_conv1d_func(dims.channels, dims.kernel_size, x.dtype, dims.weight.dtype)
    return op.tensor_ir_op(
        func,
        name,
        args=[x, conv_state, dims.weight],
        out=(
            Tensor.placeholder(x.shape, x.dtype),
            Tensor.placeholder(conv_state.shape, conv_state.dtype),
        ),
    )
