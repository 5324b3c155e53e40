"""Non-causal attention over one image's patches (the vision tower's blocks).

``o[i, h] = sum_j softmax_j(scale * q[i, h] . k[j, h]) v[j, h]`` over all n
patches, q, k, v and o ``[n, heads, hd]`` in fp32 (n symbolic: the image's
patch count).

* CPU (:func:`attention`): the product, softmax and product as Relax ops, both
  products written as "reduce the last axis of both operands" so that the CPU
  matmul rule takes them; the [heads, n, n] scores are materialised.
* GPU (:func:`gpu_attention`): a hand-scheduled kernel, one thread per (query
  patch, head), blocks of up to 64 consecutive patches of one head; each thread
  walks the keys once with an online softmax (running max and sum, the output
  rescaled as the max grows), so nothing n x n is stored.  The threads of a
  block read the same key and value at the same step (a broadcast load).  Its
  loop bodies are self-contained per thread, so ``emulate=True`` (serial
  loops, ``global`` scratch) runs the very same body on a CPU for the twins.
  dlight's matmul rule cannot be used on this shape: with a dynamic reduction
  length it needs a stack buffer as long as the image for ``p @ v`` on OpenCL,
  and the transposed form emits a strided vector load that TVM 0.27's OpenCL
  code generator prints with unbalanced parentheses (docs/surprises.md).
"""

from __future__ import annotations

import tvm
from tvm import te
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T
from tvm.target import Target

from .gpu_gated_delta_rule import _loop_kinds, _pow2_at_most, max_threads_for_target

__all__ = ["attention", "gpu_attention", "gpu_attention_func"]

F32 = "float32"
_ROWS_PER_BLOCK = 64  # query patches per block (threads), at most


def _check(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int]:
    if not (q.ndim == k.ndim == v.ndim == 3):
        raise ValueError(f"q, k, v must be [n, heads, hd], got {q.shape}, {k.shape}, {v.shape}")
    if any(t.dtype != F32 for t in (q, k, v)):
        raise ValueError(f"q, k, v must be float32, got {q.dtype}, {k.dtype}, {v.dtype}")
    heads, hd = int(q.shape[1]), int(q.shape[2])
    for t in (k, v):
        if (int(t.shape[1]), int(t.shape[2])) != (heads, hd):
            raise ValueError(f"k and v must be [n, {heads}, {hd}], got {t.shape}")
    return heads, hd


def _reduce_last(a: Tensor, b: Tensor, name: str) -> Tensor:
    """c[h, i, j] = sum_k a[h, i, k] * b[h, j, k]."""

    def compute(a: te.Tensor, b: te.Tensor):
        r = te.reduce_axis((0, a.shape[2]), name="k")
        return te.compute(
            (a.shape[0], a.shape[1], b.shape[1]),
            lambda h, i, j: te.sum(a[h, i, r] * b[h, j, r], axis=r),
            name=name,
        )

    return op.tensor_expr_op(compute, name, [a, b])


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The CPU attention: [n, heads, hd] fp32 each -> o [n, heads, hd] fp32."""
    _, hd = _check(q, k, v)
    qh, kh = (op.permute_dims(t, (1, 0, 2)) for t in (q, k))  # [heads, n, hd]
    v_t = op.permute_dims(v, (1, 2, 0))  # [heads, hd, n]
    scores = _reduce_last(qh, kh, "attention_scores") * (hd**-0.5)  # [heads, n, n]
    out = _reduce_last(op.softmax(scores, axis=-1), v_t, "attention_values")  # [heads, n, hd]
    return op.permute_dims(out, (1, 0, 2))


def gpu_attention_func(
    heads: int, head_dim: int, max_threads: int = 256, emulate: bool = False
) -> tvm.tirx.PrimFunc:
    """The GPU PrimFunc ``(q, k, v, o)``, all ``[N, heads, head_dim]`` fp32 with symbolic N."""
    H, D = heads, head_dim
    tq = _pow2_at_most(_ROWS_PER_BLOCK, min(max_threads, _ROWS_PER_BLOCK))
    loop, scope = _loop_kinds(emulate)
    scale = float(D**-0.5)

    @T.prim_func(private=True)
    def vision_attention_gpu(
        q_handle: T.handle, k_handle: T.handle, v_handle: T.handle, o_handle: T.handle
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        N = T.int64()
        Q = T.match_buffer(q_handle, (N, H, D), F32)
        K = T.match_buffer(k_handle, (N, H, D), F32)
        V = T.match_buffer(v_handle, (N, H, D), F32)
        O = T.match_buffer(o_handle, (N, H, D), F32)
        for bx in loop(H * ((N + tq - 1) // tq), "blockIdx.x"):
            for tx in loop(tq, "threadIdx.x"):
                qv = T.alloc_buffer((D,), F32, scope=scope)
                acc = T.alloc_buffer((D,), F32, scope=scope)
                run = T.alloc_buffer((3,), F32, scope=scope)  # running max, running sum, score
                h: T.let = bx % H
                i: T.let = bx // H * tq + tx
                if i < N:
                    for d in range(D):
                        qv[d] = Q[i, h, d] * T.float32(scale)
                        acc[d] = T.float32(0)
                    run[0] = T.float32(-3.0e38)
                    run[1] = T.float32(0)
                    for j in range(N):
                        run[2] = T.float32(0)
                        for d in range(D):
                            run[2] = run[2] + qv[d] * K[j, h, d]
                        # online softmax: rescale what was summed when the max grows
                        if run[2] > run[0]:
                            run[1] = run[1] * T.exp(run[0] - run[2])
                            for d in range(D):
                                acc[d] = acc[d] * T.exp(run[0] - run[2])
                            run[0] = run[2]
                        run[2] = T.exp(run[2] - run[0])
                        run[1] = run[1] + run[2]
                        for d in range(D):
                            acc[d] = acc[d] + run[2] * V[j, h, d]
                    for d in range(D):
                        O[i, h, d] = acc[d] / run[1]

    return vision_attention_gpu


def gpu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    target: Target | None = None,
    emulate: bool = False,
    name: str = "vision_attention",
) -> Tensor:
    """The GPU attention: [n, heads, hd] fp32 each -> o [n, heads, hd] fp32.
    ``target`` sizes the blocks; ``emulate``: serial loops (for the twins)."""
    heads, hd = _check(q, k, v)
    func = gpu_attention_func(heads, hd, max_threads_for_target(target), emulate=emulate)
    return op.tensor_ir_op(func, name, args=[q, k, v], out=Tensor.placeholder(q.shape, F32))
