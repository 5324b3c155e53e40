"""Causal depthwise conv1d + SiLU with a carried state, as a GPU-scheduled TIR kernel.

Same nn-level contract and math as :mod:`.causal_conv` (the CPU kernel):
``xx = concat(conv_state^T, x)`` along time, ``y[b, t, c] = silu(sum_j weight[c, j]
* xx[b, t + j, c])`` with the sum in fp32, and the new state is the last ``K - 1``
columns of ``xx`` (a call with ``T < K - 1`` keeps part of the old state).

One thread per channel (``threadIdx.x``, at most ``min(256, max_num_threads)``
per block), blocks over (sequence, channel block) on ``blockIdx.x``; consecutive
threads read consecutive channels, so every load is coalesced.  A thread keeps
its ``K`` taps in ``local`` scratch and walks the tokens; the tap loop is
unrolled (``K`` is 4 in Qwen3.5; larger kernels are looped, not unrolled).

``emulate=True`` instantiates the same body with serial loops and ``global``
scratch, so that it compiles for ``llvm`` and can be checked on a CPU.
"""

from __future__ import annotations

import tvm
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T
from tvm.target import Target

from .checks import conv_dims
from .gpu_gated_delta_rule import _loop_kinds, _pow2_at_most, max_threads_for_target

__all__ = ["causal_conv1d", "gpu_causal_conv1d_func"]

_MAX_UNROLL = 8  # taps unrolled at most (phone OpenCL compilers choke on big unrolls)


def gpu_causal_conv1d_func(
    channels: int,
    kernel_size: int,
    dtype: str,
    weight_dtype: str,
    max_threads: int = 256,
    emulate: bool = False,
) -> tvm.tirx.PrimFunc:
    """The GPU PrimFunc ``(x, conv_state, weight, y, new_state)``.

    Shapes, with symbolic batch ``B`` and sequence length ``L``: x and y
    ``[B, L, C]`` in ``dtype``; conv_state and new_state ``[B, C, K - 1]`` in
    ``dtype``; weight ``[C, K]`` in ``weight_dtype``.
    """
    if kernel_size < 2:
        raise ValueError(f"kernel_size must be at least 2, got {kernel_size}")
    C, K = channels, kernel_size
    ctx = K - 1
    tx = _pow2_at_most(C, min(max_threads, 256))
    nb = (C + tx - 1) // tx
    loop, scope = _loop_kinds(emulate)
    tap_loop = T.unroll if K <= _MAX_UNROLL else T.serial
    f32 = "float32"

    @T.prim_func(private=True)
    def causal_conv1d_gpu(
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
        for bx in loop(B * nb, "blockIdx.x"):
            for tid in loop(tx, "threadIdx.x"):
                w = T.alloc_buffer((K,), f32, scope=scope)
                acc = T.alloc_buffer((1,), f32, scope=scope)
                b: T.let = bx // nb
                c: T.let = bx % nb * tx + tid
                if c < C:
                    for j in tap_loop(K):
                        w[j] = T.Cast(f32, W[c, j])
                    for t in range(L):
                        acc[0] = T.float32(0)
                        for j in tap_loop(K):
                            # xx[b, t + j, c]: a state column while t + j < K - 1, else x[b, t + j - (K - 1), c]
                            acc[0] = acc[0] + w[j] * T.if_then_else(
                                t + j < ctx,
                                T.Cast(f32, S_in[b, c, T.min(t + j, ctx - 1)]),
                                T.Cast(f32, X[b, T.max(t + j - ctx, 0), c]),
                            )
                        Y[b, t, c] = T.Cast(
                            dtype, acc[0] / (T.float32(1) + T.exp(T.float32(0) - acc[0]))
                        )
                    # new_state[:, :, j] = xx[:, L + j, :]
                    for j in range(ctx):
                        S_out[b, c, j] = T.if_then_else(
                            L + j < ctx,
                            S_in[b, c, T.min(L + j, ctx - 1)],
                            X[b, T.max(L + j - ctx, 0), c],
                        )

    return causal_conv1d_gpu


def causal_conv1d(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    *,
    target: Target | None = None,
    max_threads: int | None = None,
    emulate: bool = False,
    name: str = "causal_conv1d",
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv1d with SiLU over ``x`` on a GPU, continuing from ``conv_state``.

    Parameters
    ----------
    x : ``[B, T, C]``, model dtype.
    conv_state : ``[B, C, K - 1]``, model dtype (zeros for a fresh sequence).
    weight : ``[C, K]`` or Hugging Face's ``conv1d.weight`` ``[C, 1, K]``
        (reshaped here), any float dtype; the sum is taken in fp32.
    target : the GPU target the kernel is built for; it sizes the blocks
        (:func:`max_threads_for_target`; ``None``: 256 threads).  An emulated
        kernel takes the GPU target it emulates.
    max_threads : threads per block, instead of the target's.
    emulate : serial loops instead of thread bindings (for checking on a CPU).

    Returns
    -------
    y : ``[B, T, C]``, model dtype.
    new_state : ``[B, C, K - 1]``, model dtype.
    """
    dims = conv_dims(x, conv_state, weight)
    if max_threads is None:
        max_threads = max_threads_for_target(target)
    func = gpu_causal_conv1d_func(
        dims.channels, dims.kernel_size, x.dtype, dims.weight.dtype, max_threads, emulate=emulate
    )
    return op.tensor_ir_op(
        func,
        name,
        args=[x, conv_state, dims.weight],
        out=(
            Tensor.placeholder(x.shape, x.dtype),
            Tensor.placeholder(conv_state.shape, conv_state.dtype),
        ),
    )
